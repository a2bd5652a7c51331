"""Table 3 baselines, cut from the trained dense model to a target MACs fraction (then KD fine-tuned by
the training engine): `uniform` (the paper's Uniform-Ratio: every head kept at full Q/K width, one common
keep ratio for every head's value dims and every FFN, chosen by L1 magnitude inside each structure),
`uniform_heads` (the same number of heads kept in every layer by L1, then one common ratio as `uniform`),
`l1_ffn` (FFN neurons ranked globally by L1 norm), `torch_pruning` (the Torch-Pruning library: head dims and
FFN neurons ranked globally) and `torch_pruning_heads` (Torch-Pruning removing whole heads, below); and
`transplant` (exactly the units a HiAP run kept, on the teacher's weights: HiAP's structure under the
baselines' fine-tune, which separates the quality of the structure from the cost of its search).

The two head-removing methods can land on a budget with more than one number of heads per layer (fewer
heads, wider FFNs): `baseline_candidates` gives one cut per head count that lands, and the caller picks one
with a score (the training engine: the validation loss of the cut, before fine-tuning)."""

from __future__ import annotations

import copy
from collections.abc import Callable
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
HEAD_COUNT_METHODS = ("uniform_heads", "torch_pruning_heads")  # one candidate cut per number of heads kept
ANALYTIC_METHODS = ("uniform", "l1_ffn", *HEAD_COUNT_METHODS)  # cut sizes from the architecture alone


def head_scores(attn) -> torch.Tensor:
    """(heads,) L1 norm of each head's weights: its Q, K and V rows of qkv and its proj columns."""
    H, Dh = attn.num_heads, attn.head_dim
    rows = attn.qkv.weight.detach().abs().sum(dim=1).view(3, H, Dh).sum(dim=(0, 2))
    return rows + attn.proj.weight.detach().abs().sum(dim=0).view(H, Dh).sum(dim=1)


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


def uniform_state(gated: nn.Module, k_value: int, k_neurons: int, heads: int | None = None) -> list[dict]:
    """Every layer keeps its `heads` largest-L1 heads (None: all), every kept head its `k_value` and every FFN
    its `k_neurons` largest-L1 units."""
    state = []
    for attn, mlp in gated_blocks(gated):
        scores = value_dim_scores(attn)
        values = torch.stack([_top(scores[h], k_value) for h in range(attn.num_heads)])
        kept_heads = _top(head_scores(attn), attn.num_heads if heads is None else heads)
        state.append({"heads": kept_heads, "values": values, "neurons": _top(neuron_scores(mlp), k_neurons)})
    return state


def l1_ffn_state(gated: nn.Module, keep_neurons: int) -> list[dict]:
    """The `keep_neurons` FFN neurons of largest L1 norm over all layers; attention untouched."""
    blocks = gated_blocks(gated)
    scores = torch.cat([neuron_scores(mlp) for _, mlp in blocks])
    kept = _top(scores, keep_neurons).split([mlp.fc1.out_features for _, mlp in blocks])
    return [{"neurons": mask} for mask in kept]


def _uniform_cut(spec: ViTSpec, heads: int, target: float, value_dims: bool) -> tuple[tuple[int, int], float]:
    """(value dims per head, neurons per FFN) of the cut keeping `heads` heads in every layer nearest `target`,
    and its MACs fraction: one common keep ratio r = neurons / hidden, the value dims the floor or ceil of
    r x head_dim (`value_dims` False: every value dim kept, Torch-Pruning's head mode)."""
    Dh, hidden, depth = spec.head_dim, spec.mlp_hidden_dense, len(spec.layers)
    dense_macs = count_macs(spec)

    def fraction(k_value: int, k_neurons: int) -> float:
        layer = LayerSpec(tuple(range(heads)), (k_value,) * heads, k_neurons)
        return count_macs(dataclasses.replace(spec, layers=(layer,) * depth)) / dense_macs

    if value_dims:
        options = {(max(1, rnd(k * Dh / hidden)), k) for k in range(hidden + 1) for rnd in (math.floor, math.ceil)}
    else:
        options = {(Dh, k) for k in range(hidden + 1)}
    sizes = min(options, key=lambda o: abs(fraction(*o) - target))
    return sizes, fraction(*sizes)


def _lands(reached: float, target: float) -> bool:
    return abs(reached / target - 1) <= TOLERANCE


def baseline_cut(spec: ViTSpec, method: str, target: float) -> dict[int, tuple[tuple[int, ...], float]]:
    """The cuts of `method` (`ANALYTIC_METHODS`) of a model of `spec` nearest `target` x its MACs, from the
    architecture alone (exact), by the number of heads kept per layer: each cut's sizes ((value dims per head,
    neurons per FFN), or (neurons kept in all,) for `l1_ffn`) and its MACs fraction. `uniform` and `l1_ffn` keep
    every head (one cut); the head-removing methods give every head count whose cut is within 0.5% of the
    target. ValueError naming the closest when none is, so that a run can be refused before any weights or
    data are read."""
    dense_macs, H = count_macs(spec), spec.num_heads
    if method in ("uniform", *HEAD_COUNT_METHODS):
        counts = range(1, H + 1) if method in HEAD_COUNT_METHODS else (H,)
        cuts = {h: _uniform_cut(spec, h, target, value_dims=method != "torch_pruning_heads") for h in counts}
    elif method == "l1_ffn":
        gamma = unit_costs(spec).gamma  # MACs are linear in the number of kept neurons
        hidden, depth = spec.mlp_hidden_dense, len(spec.layers)
        floor_macs = dense_macs - gamma * hidden * depth
        kept = min(max(round((target * dense_macs - floor_macs) / gamma), 0), hidden * depth)
        cuts = {H: ((kept,), (floor_macs + gamma * kept) / dense_macs)}
    else:
        known = ", ".join(ANALYTIC_METHODS)
        raise ValueError(f"unknown baseline {method!r}: expected one of {known} (torch_pruning: torch_pruning_cut)")
    landing = {h: cut for h, cut in cuts.items() if _lands(cut[1], target)}
    if not landing:
        closest = min((cut[1] for cut in cuts.values()), key=lambda f: abs(f - target))
        why = {
            "l1_ffn": "l1_ffn prunes only FFN neurons, so attention cost is a floor",
            "uniform": "uniform keeps every head at full Q/K width, so their cost is a floor",
            "torch_pruning_heads": "it keeps at least one head per layer at full width, so its cost is a floor",
        }.get(method, "choose another target")
        raise ValueError(f"{method} cannot reach {target:.3f} of dense MACs within 0.5% (closest: {closest:.4f}); {why}")
    return landing


def cost_floor(dense: nn.Module, method: str) -> float:
    """The smallest MACs fraction a cut of `method` reaches on the dense timm ViT `dense`: no FFN neuron and, per
    layer, every head at one value dim (`uniform`), one head at one value dim (`uniform_heads`), one head at full
    width (`torch_pruning_heads`), every head whole (`l1_ffn`); `torch_pruning`: its cheapest cut on a scan of ratios."""
    spec = describe(dense)
    dense_macs, H, Dh = count_macs(spec), spec.num_heads, spec.head_dim
    if method == "torch_pruning":  # the cheapest of a scan of ratios (TP's MACs turn up again past it)
        return min(count_macs(from_narrowed_timm(torch_pruned(dense, r / 25), spec)) for r in range(1, 25)) / dense_macs
    heads, dims = {"uniform": (H, 1), "uniform_heads": (1, 1), "torch_pruning_heads": (1, Dh), "l1_ffn": (H, Dh)}[method]
    layer = LayerSpec(tuple(range(heads)), (dims,) * heads, 0)
    return count_macs(dataclasses.replace(spec, layers=(layer,) * len(spec.layers))) / dense_macs


def baseline_candidates(dense: nn.Module, method: str, target: float) -> dict[int, PrunedViT]:
    """Every cut of a dense timm ViT to `target` x its MACs with a baseline rule, extracted, by the number of
    heads kept per layer (one entry but for `HEAD_COUNT_METHODS`); ValueError when none is within 0.5%."""
    if method == "torch_pruning":
        return {describe(dense).num_heads: torch_pruning_cut(dense, target)}
    spec = describe(dense)
    cuts = baseline_cut(spec, method, target)
    if method == "torch_pruning_heads":
        hidden = spec.mlp_hidden_dense
        # TP keeps int(hidden x (1 - ratio)) neurons per layer: the ratio of k + 0.5 kept is exact under rounding
        return {
            h: from_narrowed_timm(torch_pruned(dense, max(0.0, 1 - (sizes[1] + 0.5) / hidden), spec.num_heads - h), spec)
            for h, (sizes, _) in cuts.items()
        }
    candidates = {}
    for h, (sizes, _) in cuts.items():
        gated = gate_vit(copy.deepcopy(dense)).eval()
        set_gate_state(gated, l1_ffn_state(gated, *sizes) if method == "l1_ffn" else uniform_state(gated, *sizes, heads=h))
        candidates[h] = extract(gated)
    return candidates


def prune_to_target(dense: nn.Module, method: str, target: float, score: Callable[[nn.Module], float] | None = None) -> PrunedViT:
    """Cut a dense timm ViT to `target` x its MACs with a baseline rule and extract it (ValueError when no cut
    is within 0.5% of the target). Where several head counts land (`HEAD_COUNT_METHODS`), `score` picks the
    cut with the lowest score (the validation loss, say); without one that is refused, naming the counts."""
    candidates = baseline_candidates(dense, method, target)
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if score is None:
        raise ValueError(
            f"{method} lands on {target:.3f} of dense MACs with {sorted(candidates)} heads per layer: pass score "
            "(e.g. the validation loss of each cut) to pick one"
        )
    return min(candidates.values(), key=score)


def torch_pruned(dense: nn.Module, ratio: float, heads_removed: int | None = None) -> nn.Module:
    """Torch-Pruning's own cut of a copy of the timm ViT `dense` at `ratio` (`torch_pruning.pruner.MetaPruner`).

    Criterion: `GroupMagnitudeImportance(p=1)`, the L1 norm over every weight a coupled group removes. With
    `heads_removed` 0: groups are the head dims of each attention (Q, K and V together, the same dims in every
    head, TP's `prune_head_dims`) and the FFN neurons, ranked globally over all blocks (`global_pruning`).
    Else TP's other ViT mode (`prune_num_heads`): `heads_removed` whole heads of every layer (their mean
    importance) and `ratio` of every FFN's neurons, ranked within each layer, as TP's timm example does by
    default (a global head ranking can empty a layer). The residual width stays (its layers are ignored).
    The attention attributes TP leaves stale are updated so timm runs the result; its explicit path is used,
    as timm's fused one would rescale attention by the narrowed width."""
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
        global_pruning=heads_removed is None,
        pruning_ratio=ratio,
        ignored_layers=ignored,
        unwrapped_parameters=vectors,
        num_heads={b.attn.qkv: b.attn.num_heads for b in model.blocks},
        prune_head_dims=heads_removed is None,
        prune_num_heads=heads_removed is not None,
        # TP removes ceil(ratio x heads) per layer: half a head below the count is exact under rounding
        head_pruning_ratio=max(0.0, (heads_removed or 0) - 0.5) / spec.num_heads,
    )
    pruner.step()
    for block in model.blocks:
        block.attn.num_heads = pruner.num_heads[block.attn.qkv]
        block.attn.head_dim = block.attn.qkv.out_features // (3 * block.attn.num_heads)
        block.attn.attn_dim = block.attn.num_heads * block.attn.head_dim
        block.attn.fused_attn = False
    return model


def torch_pruning_cut(dense: nn.Module, target: float) -> PrunedViT:
    """`torch_pruned` with its one pruning ratio bisected until the MACs are within 0.5% of `target` x the
    dense MACs, converted to a `PrunedViT` (narrowed Q/K as `LayerSpec.qk_dim`), numerically equal to TP's model.
    MACs fall with the ratio only until TP starts leaving a layer's head dims whole rather than empty them (on
    the trained default teacher: 0.198 of MACs at ratio 0.74, 0.253 at 0.7425, where one layer's one head dim
    becomes 64): a ratio whose cut costs more than a smaller ratio's did, or keeps some layer wider than a
    smaller ratio's cut, lies past that turn, so the search goes below it. The width test catches the turn on
    the first ratio past it, which MACs alone miss when every ratio tried below cost more."""
    spec = describe(dense)
    dense_macs = count_macs(spec)
    lo, hi, best, tried = 0.0, 0.99, None, {}
    for _ in range(24):
        mid = (lo + hi) / 2
        candidate = from_narrowed_timm(torch_pruned(dense, mid), spec)
        fraction, widths = count_macs(candidate) / dense_macs, _layer_widths(candidate.spec)
        tried[mid] = (fraction, widths)
        if best is None or abs(fraction - target) < abs(count_macs(best) / dense_macs - target):
            best = candidate
        if abs(fraction / target - 1) <= TOLERANCE / 2:
            break
        past_the_turn = any(
            r < mid and (f < fraction or any(now > then for now, then in zip(widths, w))) for r, (f, w) in tried.items()
        )
        lo, hi = (mid, hi) if fraction > target and not past_the_turn else (lo, mid)
    reached = count_macs(best) / dense_macs
    if abs(reached / target - 1) > TOLERANCE:
        raise ValueError(
            f"torch_pruning cannot reach {target:.3f} of dense MACs within 0.5% (closest: {reached:.4f}): "
            "the residual width and the heads stay, so their cost is a floor; choose another target"
        )
    return best


def _layer_widths(spec: ViTSpec) -> list[int]:
    """Every layer's Q/K width, value width and FFN width, in one list: a cut with more pruning keeps none wider."""
    widths = []
    for layer in spec.layers:
        widths += [(layer.qk_dim or spec.head_dim) * len(layer.heads), sum(layer.value_dims), layer.mlp_hidden or 0]
    return widths


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
