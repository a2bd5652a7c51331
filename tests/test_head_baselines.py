"""The head-removing baselines (issue 30): `uniform_heads` (the same heads in every layer by L1, one common
width ratio) and Torch-Pruning's whole-head mode, each cut to a MACs target in one candidate per head
count that lands, counted exactly, and picked by a score."""

import copy

import pytest
import torch
from conftest import TINY_VARIANTS, flop_counter_macs, make_vit
from hypothesis import given, settings, strategies as st

import hiap_core
from hiap_core.core import baselines


@settings(max_examples=25, deadline=None)
@given(variant=st.sampled_from(sorted(TINY_VARIANTS)), target=st.floats(0.15, 0.9))
def test_uniform_heads_candidates_land_keep_the_top_l1_heads_and_are_counted_exactly(variant, target):
    dense = make_vit(**TINY_VARIANTS[variant])
    dense_macs = hiap_core.count_macs(dense)
    try:
        candidates = baselines.baseline_candidates(dense, "uniform_heads", target)
    except ValueError as err:  # this 24-wide model's steps are coarse: the error names the closest cut
        assert "cannot reach" in str(err) and "closest" in str(err)
        return
    gated = hiap_core.gate_vit(copy.deepcopy(dense)).eval()
    for heads, pruned in candidates.items():
        assert abs(hiap_core.count_macs(pruned) / dense_macs / target - 1) <= baselines.TOLERANCE
        assert hiap_core.count_macs(pruned) == flop_counter_macs(pruned, (16, 16))
        for layer, (attn, _) in zip(pruned.spec.layers, hiap_core.gated_blocks(gated)):
            assert len(layer.heads) == heads and len(set(layer.value_dims)) == 1  # one width ratio for all
            top = set(baselines.head_scores(attn).topk(heads).indices.tolist())
            assert set(layer.heads) == top


@pytest.mark.parametrize("target", [0.67, 0.33, 0.2])
def test_uniform_heads_equals_its_hardened_gated_cut(target):
    dense = hiap_core.cifar_vit_tiny().eval()
    spec = hiap_core.describe(dense)
    x = torch.randn(2, 3, 32, 32)
    for heads, ((k_value, k_neurons), _) in baselines.baseline_cut(spec, "uniform_heads", target).items():
        gated = hiap_core.gate_vit(copy.deepcopy(dense)).eval()
        hiap_core.set_gate_state(gated, baselines.uniform_state(gated, k_value, k_neurons, heads=heads))
        pruned = baselines.baseline_candidates(dense, "uniform_heads", target)[heads]
        with torch.no_grad():
            assert (pruned(x) - gated(x)).abs().max() <= 1e-5


def test_uniform_keeps_every_head_and_uniform_heads_reaches_below_its_floor():
    spec = hiap_core.describe(hiap_core.cifar_vit_tiny())
    assert list(baselines.baseline_cut(spec, "uniform", 0.2)) == [3]
    with pytest.raises(ValueError, match="full Q/K width, so their cost is a floor"):
        baselines.baseline_cut(spec, "uniform", 0.1)
    assert list(baselines.baseline_cut(spec, "uniform_heads", 0.1)) == [1]  # one head per layer is all that fits


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_torch_pruning_heads_equals_torch_prunings_model_removes_whole_heads_and_is_counted_exactly(variant):
    pytest.importorskip("torch_pruning")
    dense = make_vit(**TINY_VARIANTS[variant])
    pruned_timm = baselines.torch_pruned(dense, 0.5, heads_removed=1)
    pruned = baselines.from_narrowed_timm(pruned_timm, hiap_core.describe(dense))
    for layer in pruned.spec.layers:  # two heads left in every layer, each at full width
        assert len(layer.heads) == 2 and layer.value_dims == (8, 8) and layer.qk_dim is None and layer.mlp_hidden == 24
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), pruned_timm(x), atol=1e-5, rtol=1e-5)
    assert hiap_core.count_macs(pruned) == flop_counter_macs(pruned_timm, (16, 16))


def test_torch_pruning_heads_candidates_land_on_the_analytic_cut():
    pytest.importorskip("torch_pruning")
    dense = hiap_core.cifar_vit_tiny().eval()
    spec, dense_macs = hiap_core.describe(dense), hiap_core.count_macs(dense)
    cuts = baselines.baseline_cut(spec, "torch_pruning_heads", 0.33)
    candidates = baselines.baseline_candidates(dense, "torch_pruning_heads", 0.33)
    assert sorted(candidates) == sorted(cuts) == [1, 2]  # three full heads leave too few neurons to land
    for heads, pruned in candidates.items():
        assert hiap_core.count_macs(pruned) / dense_macs == pytest.approx(cuts[heads][1], abs=1e-12)
        assert {layer.mlp_hidden for layer in pruned.spec.layers} == {cuts[heads][0][1]}
    with pytest.raises(ValueError, match="at least one head per layer at full width"):
        baselines.baseline_cut(spec, "torch_pruning_heads", 0.1)


def test_several_landing_head_counts_need_a_score_and_the_lowest_wins():
    dense = hiap_core.cifar_vit_tiny().eval()
    with pytest.raises(ValueError, match=r"with \[1, 2, 3\] heads per layer: pass score"):
        hiap_core.prune_to_target(dense, "uniform_heads", 0.5)
    picked = hiap_core.prune_to_target(dense, "uniform_heads", 0.5, score=lambda m: abs(len(m.spec.layers[0].heads) - 2))
    assert {len(layer.heads) for layer in picked.spec.layers} == {2}
