import math

import pytest
import timm
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode

import hiap_core
from conftest import TINY_VARIANTS, cifar_vit_tiny, flop_counter_macs, gate_states, gated_copy, make_vit

DENSE_MODELS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"]


def test_pinned_cifar_vit_tiny_macs():
    model = cifar_vit_tiny()
    assert hiap_core.count_macs(model) == 182_849_664
    assert hiap_core.count_macs(model, attention_matmuls=False) == 173_115_264


def test_pinned_deit_small_macs():
    assert hiap_core.count_macs(timm.create_model("deit_small_patch16_224")) == 4_598_882_304


def attention_free_flop_counter_macs(model, img_size) -> int:
    """FlopCounterMode without the attention matmuls (the only batched matmuls in these models)."""
    hiap_core.set_fused_attention(model, False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, *img_size))
    ops = counter.get_flop_counts()["Global"]
    bmm = sum(v for k, v in ops.items() if "bmm" in str(k))
    return (counter.get_total_flops() - bmm) // 2


@pytest.mark.parametrize("name", DENSE_MODELS + ["cifar_vit_tiny"] + [f"tiny:{v}" for v in sorted(TINY_VARIANTS)])
def test_count_macs_equals_flop_counter_for_dense_models(name):
    if name == "cifar_vit_tiny":
        model = cifar_vit_tiny()
    elif name.startswith("tiny:"):
        model = make_vit(**TINY_VARIANTS[name[5:]])
    else:
        model = timm.create_model(name).eval()
    size = model.patch_embed.img_size
    assert hiap_core.count_macs(model) == flop_counter_macs(model, size)
    assert hiap_core.count_macs(model, attention_matmuls=False) == attention_free_flop_counter_macs(model, size)


def test_img_size_override_matches_a_model_built_at_that_size():
    base = cifar_vit_tiny()
    bigger = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0, num_classes=10
    )
    assert hiap_core.count_macs(base, img_size=64) == hiap_core.count_macs(bigger) == flop_counter_macs(bigger, (64, 64))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        hiap_core.count_macs(base, img_size=30)


def test_unit_costs_follow_design_formulas():
    spec = hiap_core.describe(cifar_vit_tiny())
    n, d, dh = 65, 192, 64
    costs = hiap_core.unit_costs(spec)
    assert (costs.alpha, costs.beta, costs.gamma) == (2 * n * d * dh + n * n * dh, 2 * n * d + n * n, 2 * n * d)


@settings(max_examples=25)
@given(data=st.data())
def test_hard_cost_of_gated_equals_extracted_and_flop_counter(data):
    variant = data.draw(st.sampled_from(sorted(TINY_VARIANTS)))
    gated = gated_copy(make_vit(**TINY_VARIANTS[variant]))
    hiap_core.set_gate_state(gated, data.draw(gate_states(depth=2, heads=3, head_dim=8, hidden=48)))
    pruned = hiap_core.extract(gated)
    for matmuls in (True, False):
        assert hiap_core.count_macs(gated, attention_matmuls=matmuls) == hiap_core.count_macs(pruned, attention_matmuls=matmuls)
    assert hiap_core.count_macs(pruned) == flop_counter_macs(pruned, (16, 16))
    assert hiap_core.count_macs(pruned, attention_matmuls=False) == attention_free_flop_counter_macs(pruned, (16, 16))


def empty_open_heads_correction(gated, attention_matmuls=True) -> float:
    """sum alpha p(g) prod_j (1 - p(d_j)): what the hard cost saves on an open head with no value dim."""
    alpha = hiap_core.unit_costs(hiap_core.describe(gated), attention_matmuls).alpha
    total = 0.0
    for attn, _ in hiap_core.gated_blocks(gated):
        p_value = attn.value_gate.probs().detach().double().view(attn.num_heads, attn.head_dim)
        total += float(alpha * (attn.head_gate.probs().double() * (1 - p_value).prod(dim=1)).sum().detach())
    return total


@settings(max_examples=25)
@given(data=st.data())
def test_expected_macs_equals_hard_cost_for_saturated_logits(data):
    gated = gated_copy(make_vit())
    hiap_core.set_gate_state(gated, data.draw(gate_states(depth=2, heads=3, head_dim=8, hidden=48)), magnitude=40.0)
    for matmuls in (True, False):
        expected = hiap_core.expected_macs(gated, attention_matmuls=matmuls)
        hard = hiap_core.count_macs(gated, attention_matmuls=matmuls)
        got = float(expected.total.detach()) - empty_open_heads_correction(gated, matmuls)
        assert got == pytest.approx(hard, rel=1e-6, abs=1.0)


def test_expected_macs_matches_hard_cost_when_no_open_head_is_empty():
    gated = gated_copy(cifar_vit_tiny())
    state = [
        {
            "heads": torch.tensor([True, False, True]),
            "values": torch.rand(3, 64) > 0.3,
            "ffn": torch.tensor(i % 2 == 0),
            "neurons": torch.rand(768) > 0.5,
        }
        for i in range(6)
    ]
    hiap_core.set_gate_state(gated, state, magnitude=40.0)
    expected = hiap_core.expected_macs(gated)
    assert float(expected.total.detach()) == pytest.approx(hiap_core.count_macs(gated), rel=1e-6)


def test_expected_macs_matches_monte_carlo_of_hard_cost():
    torch.manual_seed(0)
    gated = gated_copy(make_vit(depth=3))
    with torch.no_grad():
        for gate in hiap_core.core.gated_vit.gates(gated):
            gate.logits.copy_(torch.randn_like(gate.logits) * 1.5)
    probs = [g.probs().detach().clone() for g in hiap_core.core.gated_vit.gates(gated)]
    expected = float(hiap_core.expected_macs(gated).total.detach()) - empty_open_heads_correction(gated)
    samples = []
    for _ in range(1500):
        with torch.no_grad():
            for gate, p in zip(hiap_core.core.gated_vit.gates(gated), probs):
                gate.logits.copy_(torch.where(torch.rand_like(p) < p, 10.0, -10.0))
        samples.append(hiap_core.count_macs(gated))
    mc = torch.tensor(samples, dtype=torch.float64)
    stderr = float(mc.std() / math.sqrt(len(samples)))
    assert abs(float(mc.mean()) - expected) <= 4 * stderr
    assert stderr > 0


def test_expected_macs_parts_and_gradients():
    gated = gated_copy(make_vit())
    expected = hiap_core.expected_macs(gated)
    spec = hiap_core.describe(gated)
    assert expected.dense_prunable == hiap_core.dense_prunable_macs(spec)
    assert expected.static + expected.dense_prunable == hiap_core.count_macs(make_vit())
    macro, micro = hiap_core.cost_penalties(expected)
    (macro + micro).backward()
    for gate in hiap_core.core.gated_vit.gates(gated):
        assert gate.logits.grad is not None and torch.all(gate.logits.grad > 0)
