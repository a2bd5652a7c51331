"""`optimize_for_inference`: the compiled model gives eager's outputs within the stated tolerance, for an
extracted model (either attention layout) and a dense timm one, and refuses what it cannot do."""

import pytest
import torch

import hiap_core
from hiap_core.core import inference
from conftest import gate_states, gated_copy, make_vit
from hypothesis import find


def mixed_width_model() -> hiap_core.PrunedViT:
    """An extracted tiny ViT whose heads keep different value widths (so the two layouts differ)."""
    torch.manual_seed(0)
    gated = gated_copy(make_vit())
    state = find(
        gate_states(depth=2, heads=3, head_dim=8, hidden=48),
        lambda s: any(len({int(v.sum()) for v in layer["values"][layer["heads"]]}) > 1 for layer in s),
    )
    hiap_core.set_gate_state(gated, state)
    pruned = hiap_core.extract(gated)
    assert any(not m.values_as_wide_as_qk for m in pruned.modules() if isinstance(m, hiap_core.core.pruned.PrunedAttention))
    return pruned


def test_the_optimized_extracted_model_matches_eager_at_the_example_shape_and_another():
    model = mixed_width_model()
    x, other = torch.randn(4, 3, 16, 16), torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        eager_x, eager_other = model(x), model(other)
    model.train()  # the caller's model is left as it was: mode and layout
    optimized = hiap_core.optimize_for_inference(model, x)
    assert model.training and not any(getattr(m, "pad_values", False) for m in model.modules())
    model.eval()
    assert optimized.attention_layout in ("per_head", "padded")  # both compiled, the faster kept
    assert optimized.max_abs_diff <= optimized.tolerance == inference.TOLERANCE[torch.float32]
    torch.testing.assert_close(optimized(x), eager_x, rtol=0, atol=1e-4)
    torch.testing.assert_close(optimized(other), eager_other, rtol=0, atol=1e-4)  # another batch: recompiled
    assert optimized.state_dict().keys() == {f"model.{k}" for k in model.state_dict()}
    assert not optimized.model.training


def test_a_dense_timm_model_is_optimized_too_and_has_no_layout_to_choose():
    dense = make_vit()
    x = torch.randn(3, 3, 16, 16)
    optimized = hiap_core.optimize_for_inference(dense, x)
    assert optimized.attention_layout == "n/a"
    with torch.inference_mode():
        torch.testing.assert_close(optimized(x), dense(x), rtol=0, atol=1e-4)


def test_a_compiled_model_outside_the_tolerance_is_refused(monkeypatch):
    monkeypatch.setitem(inference.TOLERANCE, torch.float32, -1.0)  # no difference passes: the check must refuse
    with pytest.raises(RuntimeError, match="differs from eager"):
        hiap_core.optimize_for_inference(make_vit(), torch.randn(1, 3, 16, 16))


def test_a_machine_where_compilation_fails_gets_one_clear_error(monkeypatch):
    def no_compiler(*args):
        raise torch._dynamo.exc.BackendCompilerFailed(no_compiler, RuntimeError("Compiler: cc is not found"), None)

    monkeypatch.setattr(torch, "compile", lambda model, **options: no_compiler)
    with pytest.raises(RuntimeError, match="torch.compile failed on this machine \\(Compiler: cc is not found\\).*C\\+\\+"):
        hiap_core.optimize_for_inference(make_vit(), torch.randn(1, 3, 16, 16))


def test_bad_arguments_are_one_clear_error():
    model = mixed_width_model()
    with pytest.raises(ValueError, match="attention_layout = 'fastest'"):
        hiap_core.optimize_for_inference(model, torch.randn(1, 3, 16, 16), attention_layout="fastest")
    with pytest.raises(ValueError, match="example_batch must be"):
        hiap_core.optimize_for_inference(model, torch.randn(3, 16, 16))


def test_auto_compiles_both_layouts_and_an_explicit_layout_is_kept():
    model = mixed_width_model()
    assert inference._layouts(model, "auto") == ["per_head", "padded"]
    assert inference._layouts(make_vit(), "auto") == ["n/a"]
    optimized = hiap_core.optimize_for_inference(model, torch.randn(2, 3, 16, 16), attention_layout="per_head")
    assert optimized.attention_layout == "per_head"
    assert not any(m.pad_values for m in optimized.model.modules() if isinstance(m, hiap_core.core.pruned.PrunedAttention))


def test_models_of_the_same_shapes_with_other_weights_each_give_their_own_outputs():
    """Frozen weights are constants of the compiled code: two models alike in shape must not share it."""
    x = torch.randn(2, 3, 16, 16)
    first, second = make_vit(seed=0), make_vit(seed=1)
    optimized = [hiap_core.optimize_for_inference(m, x) for m in (first, second)]
    with torch.inference_mode():
        for model, fast in zip((first, second), optimized):
            torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-4)


def test_on_cpu_the_weights_are_folded_into_the_compiled_code():
    """Freezing is on: weights changed after optimizing do not reach the compiled model (hence: optimize again)."""
    x = torch.randn(2, 3, 16, 16)
    optimized = hiap_core.optimize_for_inference(make_vit(), x)
    before = optimized(x).clone()
    with torch.no_grad():
        optimized.model.head.bias.add_(1.0)
    torch.testing.assert_close(optimized(x), before)
