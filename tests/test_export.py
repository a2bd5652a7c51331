"""ONNX and torch.export of extracted models: outputs equal PyTorch, the batch stays dynamic, bad input is refused."""

import pytest
import torch
from conftest import TINY_VARIANTS, gated_copy, make_vit

import hiap_core
from hiap_core.core import export

GEN_SEED = 7


def pruned_variant(name: str) -> hiap_core.PrunedViT:
    """An extracted model of a tiny variant under a random gate state with one FFN removed."""
    gated = gated_copy(make_vit(**TINY_VARIANTS[name]))
    gen = torch.Generator().manual_seed(GEN_SEED)
    state = []
    for i, (attn, mlp) in enumerate(hiap_core.gated_blocks(gated)):
        heads = torch.rand(attn.num_heads, generator=gen) < 0.7
        heads[0] = True
        values = torch.rand(attn.num_heads, attn.head_dim, generator=gen) < 0.6
        values[:, 0] = True
        state.append(
            {"heads": heads, "values": values, "ffn": i != 0, "neurons": torch.rand(mlp.fc1.out_features, generator=gen) < 0.5}
        )
    hiap_core.set_gate_state(gated, state)
    return hiap_core.extract(gated).eval()


@pytest.mark.parametrize("name", sorted(TINY_VARIANTS))
def test_onnx_matches_pytorch_at_any_batch(name, tmp_path):
    model = pruned_variant(name)
    path = hiap_core.export_onnx(model, tmp_path / "model.onnx")
    assert path.is_file() and not [p for p in tmp_path.iterdir() if p != path]  # one self-contained file, no temp left
    session = export.onnx_session(path, threads=1)
    assert [i.name for i in session.get_inputs()] == ["images"] and [o.name for o in session.get_outputs()] == ["logits"]
    x = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_torch_export_matches_pytorch_with_a_dynamic_batch():
    model = pruned_variant("cls_token")
    program = export.export_program(model)
    for batch in (1, 6):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), atol=1e-6, rtol=0)


def test_export_refuses_a_model_that_is_not_extracted(tmp_path):
    with pytest.raises(TypeError, match="extract"):
        hiap_core.export_onnx(make_vit(), tmp_path / "dense.onnx")
    with pytest.raises(TypeError, match="extract"):
        export.export_program(gated_copy(make_vit()))


def test_a_failed_onnx_check_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "onnx_max_abs_diff", lambda model, path: 0.5)
    with pytest.raises(ValueError, match="differs from PyTorch by 0.5"):
        hiap_core.export_onnx(pruned_variant("cls_token"), tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_models_without_values_or_off_fp32_cpu_are_refused_in_one_line(tmp_path):
    """A meta-device model, a bf16 ONNX export and map_location 'meta' or cpu:0 gave torch-internal or misleading
    ("corrupt or mixed-up files") messages."""
    pruned = hiap_core.extract(gated_copy(make_vit()))
    folder = hiap_core.save_pruned(pruned, tmp_path / "m")
    with torch.device("meta"):
        empty = hiap_core.PrunedViT(pruned.spec)
        gated = hiap_core.gate_vit(make_vit())
    refusals = [
        (lambda: hiap_core.save_pruned(empty, tmp_path / "e"), "save_pruned: the model's weights are on the meta device"),
        (lambda: export.export_program(empty), "export: the model's weights are on the meta device"),
        (lambda: export.export_onnx(empty, tmp_path / "e.onnx"), "ONNX export: the model's weights are on the meta device"),
        (lambda: hiap_core.extract(gated), "the gated model's structure: the model's weights are on the meta device"),
        (lambda: hiap_core.count_macs(gated), "the gated model's structure: the model's weights are on the meta device"),
        (lambda: export.export_onnx(pruned.to(torch.bfloat16), tmp_path / "b.onnx"), "takes an fp32 model on the CPU.*bfloat16"),
        (lambda: hiap_core.load_pruned(folder, map_location="meta"), "holds no weights; load_spec reads the architecture"),
    ]
    for call, message in refusals:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    assert not (tmp_path / "b.onnx").exists()
    loaded = hiap_core.load_pruned(folder, map_location=torch.device("cpu", 0))
    assert loaded.spec == pruned.spec
    program = export.export_program(pruned.to(torch.bfloat16))  # torch.export keeps the model's dtype
    assert program.module()(torch.randn(3, 3, 16, 16, dtype=torch.bfloat16)).shape == (3, 5)
