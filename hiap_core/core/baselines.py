"""Table 3 baselines, cut from the trained dense model to a target MACs fraction (then KD fine-tuned by
the training engine): `uniform` (one common keep ratio for every head's value dims and every FFN,
chosen by L1 magnitude inside each structure), `l1_ffn` (FFN neurons ranked globally by L1 norm) and
`torch_pruning` (the Torch-Pruning library: head dims and FFN neurons ranked globally, below); and
`transplant` (exactly the units a HiAP run kept, on the teacher's weights: HiAP's structure under the
baselines' fine-tune, which separates the quality of the structure from the cost of its search)."""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from .cost import count_macs, unit_costs
from .describe import describe
from .extract import copy_linear, copy_norm, extract, pruned_shell
from .gated_vit import gate_vit, gated_blocks, set_gate_state
from .pruned import PrunedViT
from .spec import LayerSpec, ViTSpec

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


def baseline_cut(spec: ViTSpec, method: str, target: float) -> tuple[tuple[int, ...], float]:
    """The `uniform` or `l1_ffn` cut of a model of `spec` nearest `target` x its MACs, from the architecture
    alone (exact): its sizes ((value dims per head, neurons per FFN), or (neurons kept in all,)) and its MACs
    fraction. ValueError naming the closest when that is not within 0.5% of the target, so that a run can be
    refused before any weights or data are read."""
    dense_macs = count_macs(spec)
    H, Dh, hidden, depth = spec.num_heads, spec.head_dim, spec.mlp_hidden_dense, len(spec.layers)
    if method == "uniform":
        # One common keep ratio r = k_neurons / hidden; value dims per head: floor or ceil of r * head_dim.
        def fraction(k_value: int, k_neurons: int) -> float:
            layer = LayerSpec(tuple(range(H)), (k_value,) * H, k_neurons)
            return count_macs(dataclasses.replace(spec, layers=(layer,) * depth)) / dense_macs

        options = {(max(1, rnd(k * Dh / hidden)), k) for k in range(hidden + 1) for rnd in (math.floor, math.ceil)}
        sizes = min(options, key=lambda o: abs(fraction(*o) - target))
        reached = fraction(*sizes)
    elif method == "l1_ffn":
        gamma = unit_costs(spec).gamma  # MACs are linear in the number of kept neurons
        floor_macs = dense_macs - gamma * hidden * depth
        sizes = (min(max(round((target * dense_macs - floor_macs) / gamma), 0), hidden * depth),)
        reached = (floor_macs + gamma * sizes[0]) / dense_macs
    else:
        raise ValueError(f"unknown baseline {method!r}: expected 'uniform' or 'l1_ffn' (torch_pruning: torch_pruning_cut)")
    if abs(reached / target - 1) > TOLERANCE:
        raise ValueError(
            f"{method} cannot reach {target:.3f} of dense MACs within 0.5% (closest: {reached:.4f}); "
            f"{'l1_ffn prunes only FFN neurons, so attention cost is a floor' if method == 'l1_ffn' else 'choose another target'}"
        )
    return sizes, reached


def prune_to_target(dense: nn.Module, method: str, target: float) -> PrunedViT:
    """Cut a dense timm ViT to `target` x its MACs with a baseline rule and extract it: the cut `baseline_cut`
    picks on the architecture, applied by L1 magnitude (ValueError when no cut is within 0.5% of the target)."""
    if method == "torch_pruning":
        return torch_pruning_cut(dense, target)
    gated = gate_vit(copy.deepcopy(dense)).eval()
    sizes, _ = baseline_cut(describe(gated), method, target)
    set_gate_state(gated, uniform_state(gated, *sizes) if method == "uniform" else l1_ffn_state(gated, *sizes))
    return extract(gated)


def torch_pruned(dense: nn.Module, ratio: float) -> nn.Module:
    """Torch-Pruning's own cut of a copy of the timm ViT `dense` at `ratio` (`torch_pruning.pruner.MetaPruner`).

    Criterion: `GroupMagnitudeImportance(p=1)`, the L1 norm over every weight a coupled group removes, ranked
    globally over all blocks (`global_pruning`). Groups: the head dims of each attention (Q, K and V together,
    the same dims in every head, TP's `prune_head_dims`) and the FFN neurons; the residual width stays (its
    layers are ignored). The attention attributes TP leaves stale are updated so timm runs the result; its
    explicit path is used, as timm's fused one would rescale attention by the narrowed width."""
    import torch_pruning as tp  # optional: only this baseline needs it

    model = copy.deepcopy(dense).eval()
    spec = describe(dense)
    ignored = [model.patch_embed.proj, model.head] + [m for b in model.blocks for m in (b.attn.proj, b.mlp.fc2)]
    vectors = [(p, 2) for p in (model.cls_token, model.reg_token, model.pos_embed) if p is not None]
    vectors += [(m.gamma, 0) for m in model.modules() if type(m).__name__ == "LayerScale"]  # residual-width vectors
    pruner = tp.pruner.MetaPruner(
        model,
        torch.randn(1, spec.in_chans, *spec.img_size),
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        global_pruning=True,
        pruning_ratio=ratio,
        ignored_layers=ignored,
        unwrapped_parameters=vectors,
        num_heads={b.attn.qkv: b.attn.num_heads for b in model.blocks},
        prune_head_dims=True,
        prune_num_heads=False,
    )
    pruner.step()
    for block in model.blocks:
        block.attn.head_dim = block.attn.qkv.out_features // (3 * block.attn.num_heads)
        block.attn.attn_dim = block.attn.num_heads * block.attn.head_dim
        block.attn.fused_attn = False
    return model


def torch_pruning_cut(dense: nn.Module, target: float) -> PrunedViT:
    """`torch_pruned` with its one pruning ratio bisected until the MACs are within 0.5% of `target` x the
    dense MACs, converted to a `PrunedViT` (narrowed Q/K as `LayerSpec.qk_dim`), numerically equal to TP's model."""
    spec = describe(dense)
    dense_macs = count_macs(spec)
    lo, hi, best = 0.0, 0.99, None
    for _ in range(20):  # MACs fall as the ratio grows
        mid = (lo + hi) / 2
        candidate = from_narrowed_timm(torch_pruned(dense, mid), spec)
        fraction = count_macs(candidate) / dense_macs
        if best is None or abs(fraction - target) < abs(count_macs(best) / dense_macs - target):
            best = candidate
        if abs(fraction / target - 1) <= TOLERANCE / 2:
            break
        lo, hi = (mid, hi) if fraction > target else (lo, mid)
    reached = count_macs(best) / dense_macs
    if abs(reached / target - 1) > TOLERANCE:
        raise ValueError(
            f"torch_pruning cannot reach {target:.3f} of dense MACs within 0.5% (closest: {reached:.4f}): "
            "the residual width and the heads stay, so their cost is a floor; choose another target"
        )
    return best


@torch.no_grad()
def from_narrowed_timm(model: nn.Module, dense: ViTSpec) -> PrunedViT:
    """The `PrunedViT` of a timm ViT whose attention head dims (Q, K and V alike) and FFN widths were cut per
    layer by another tool, on the dense model's `dense` spec (the attention scale stays the dense one, as
    such tools leave it)."""
    layers = []
    for block in model.blocks:
        heads = block.attn.num_heads
        width = block.attn.qkv.out_features // (3 * heads)
        qk = None if width == dense.head_dim else width
        layers.append(LayerSpec(tuple(range(heads)), (width,) * heads, block.mlp.fc1.out_features, qk))
    spec = dataclasses.replace(dense, layers=tuple(layers))
    pruned = pruned_shell(spec, model)
    for dst, src in zip(pruned.blocks, model.blocks):
        copy_norm(dst.norm1, src.norm1)
        copy_linear(dst.attn.qkv, src.attn.qkv)
        copy_linear(dst.attn.proj, src.attn.proj)
        copy_norm(dst.norm2, src.norm2)
        copy_linear(dst.mlp.fc1, src.mlp.fc1)
        copy_linear(dst.mlp.fc2, src.mlp.fc2)
        for name in ("ls1", "ls2"):
            if getattr(dst, name) is not None:
                getattr(dst, name).gamma.copy_(getattr(src, name).gamma)
    return pruned.eval()


def closing_gate_state(closing: list[dict], depth: int) -> list[dict]:
    """The gate state (`set_gate_state`) a HiAP run ended with, from its `closing.csv` rows
    (`Pruner.closing_steps`: a unit with `closed_step` -1 was open at the end)."""
    state = [{} for _ in range(depth)]
    keys = {"head": "heads", "value_dim": "values", "ffn": "ffn", "neuron": "neurons"}
    for row in closing:
        state[int(row["layer"])].setdefault(keys[row["kind"]], []).append((int(row["index"]), int(row["closed_step"]) < 0))
    for layer in state:
        for key, units in layer.items():
            layer[key] = torch.tensor([is_open for _, is_open in sorted(units)])
        if "ffn" in layer:
            layer["ffn"] = layer["ffn"][0]
    return state


def transplant(dense: nn.Module, closing: list[dict]) -> PrunedViT:
    """The dense model cut to exactly the units of a HiAP run (its `closing.csv` rows) and extracted."""
    gated = gate_vit(copy.deepcopy(dense)).eval()
    state = closing_gate_state(closing, len(gated_blocks(gated)))
    for layer in state:
        if "values" in layer:
            layer["values"] = layer["values"].view(len(layer["heads"]), -1)
    set_gate_state(gated, state)
    return extract(gated)
