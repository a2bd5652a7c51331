"""Table 3 baselines, cut from the trained dense model to a target MACs fraction (then KD fine-tuned by
the training engine): `uniform` (one common keep ratio for every head's value dims and every FFN,
chosen by L1 magnitude inside each structure) and `l1_ffn` (FFN neurons ranked globally by L1 norm)."""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from .cost import count_macs, unit_costs
from .describe import describe
from .extract import extract
from .gated_vit import gate_vit, gated_blocks, set_gate_state
from .pruned import PrunedViT
from .spec import LayerSpec

TOLERANCE = 0.005  # relative to the target MACs fraction


def value_dim_scores(attn) -> torch.Tensor:
    """(heads, head_dim) L1 norm of each value dim's weights: its V row of qkv and its proj column."""
    H, Dh = attn.num_heads, attn.head_dim
    v_rows = attn.qkv.weight.detach()[2 * H * Dh :].abs().sum(dim=1)
    proj_cols = attn.proj.weight.detach().abs().sum(dim=0)
    return (v_rows + proj_cols).view(H, Dh)


def neuron_scores(mlp) -> torch.Tensor:
    """L1 norm of each FFN neuron's weights: its fc1 row and its fc2 column."""
    return mlp.fc1.weight.detach().abs().sum(dim=1) + mlp.fc2.weight.detach().abs().sum(dim=0)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[scores.topk(k).indices] = True
    return mask


def uniform_state(gated: nn.Module, k_value: int, k_neurons: int) -> list[dict]:
    """Every head keeps its `k_value` and every FFN its `k_neurons` largest-L1 units."""
    state = []
    for attn, mlp in gated_blocks(gated):
        scores = value_dim_scores(attn)
        values = torch.stack([_top(scores[h], k_value) for h in range(attn.num_heads)])
        state.append({"values": values, "neurons": _top(neuron_scores(mlp), k_neurons)})
    return state


def l1_ffn_state(gated: nn.Module, keep_neurons: int) -> list[dict]:
    """The `keep_neurons` FFN neurons of largest L1 norm over all layers; attention untouched."""
    blocks = gated_blocks(gated)
    scores = torch.cat([neuron_scores(mlp) for _, mlp in blocks])
    kept = _top(scores, keep_neurons).split([mlp.fc1.out_features for _, mlp in blocks])
    return [{"neurons": mask} for mask in kept]


def prune_to_target(dense: nn.Module, method: str, target: float) -> PrunedViT:
    """Cut a dense timm ViT to `target` x its MACs with a baseline rule and extract it.

    Candidates are costed on the architecture alone (exact), the closest is applied; ValueError when it
    is not within 0.5% of the target."""
    gated = gate_vit(copy.deepcopy(dense)).eval()
    spec = describe(gated)
    dense_macs = count_macs(spec)
    H, Dh, hidden, depth = spec.num_heads, spec.head_dim, spec.mlp_hidden_dense, len(spec.layers)
    if method == "uniform":
        # One common keep ratio r = k_neurons / hidden; value dims per head: floor or ceil of r * head_dim.
        def macs(k_value: int, k_neurons: int) -> int:
            layer = LayerSpec(tuple(range(H)), (k_value,) * H, k_neurons)
            return count_macs(dataclasses.replace(spec, layers=(layer,) * depth))

        options = {(max(1, rnd(k * Dh / hidden)), k) for k in range(hidden + 1) for rnd in (math.floor, math.ceil)}
        state = uniform_state(gated, *min(options, key=lambda o: abs(macs(*o) / dense_macs - target)))
    elif method == "l1_ffn":
        gamma = unit_costs(spec).gamma  # MACs are linear in the number of kept neurons
        floor_macs = dense_macs - gamma * hidden * depth
        keep = min(max(round((target * dense_macs - floor_macs) / gamma), 0), hidden * depth)
        state = l1_ffn_state(gated, keep)
    else:
        raise ValueError(f"unknown baseline {method!r}: expected 'uniform' or 'l1_ffn'")
    set_gate_state(gated, state)
    reached = count_macs(gated) / dense_macs
    if abs(reached / target - 1) > TOLERANCE:
        raise ValueError(
            f"{method} cannot reach {target:.3f} of dense MACs within 0.5% (closest: {reached:.4f}); "
            f"{'l1_ffn prunes only FFN neurons, so attention cost is a floor' if method == 'l1_ffn' else 'choose another target'}"
        )
    return extract(gated)
