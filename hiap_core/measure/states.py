"""Random gate states for measurements: at a given MACs fraction (benchmarks, held-out latency models)
and with independently drawn keep rates per unit kind (the latency fit)."""

from __future__ import annotations

import torch
from torch import nn

import copy

from ..core.cost import count_macs
from ..core.describe import describe
from ..core.extract import extract
from ..core.gated_vit import gate_vit, gated_blocks, set_gate_state
from ..core.pruned import PrunedViT


def extracted_models(build, fractions) -> tuple[nn.Module, dict[float, PrunedViT]]:
    """A dense model from `build()` (seeded random weights) and one model extracted from it at each MACs
    fraction (`random_feasible_state`), in eval mode on the CPU."""
    torch.manual_seed(0)
    dense = build().eval()
    pruned = {}
    for fraction in fractions:
        gated = gate_vit(copy.deepcopy(dense)).eval()
        set_gate_state(gated, random_feasible_state(gated, fraction))
        pruned[fraction] = extract(gated)
    return dense, pruned


def empty_state(gated: nn.Module) -> list[dict]:
    """Every head and FFN removed: what remains (patch embedding, LayerNorms of nothing, residual adds of
    biases, the head) is the time no pruning can take away."""
    return [{"heads": torch.zeros(a.num_heads, dtype=torch.bool), "ffn": torch.tensor(False)} for a, _ in gated_blocks(gated)]


def random_feasible_state(gated: nn.Module, macs_fraction: float, seed: int = 0) -> list[dict]:
    """A random gate state whose hard MACs are `macs_fraction` of dense (within 0.5%), keeping at least one
    head with one value dim per layer. One uniform draw per unit; a unit is kept iff its draw < r, and
    r is bisected, so states are nested and MACs are monotone in r."""
    gen = torch.Generator().manual_seed(seed)
    blocks = gated_blocks(gated)
    draws = [
        {
            "heads": torch.rand(a.num_heads, generator=gen),
            "values": torch.rand(a.num_heads, a.head_dim, generator=gen),
            "ffn": torch.rand((), generator=gen),
            "neurons": torch.rand(m.fc1.out_features, generator=gen),
        }
        for a, m in blocks
    ]
    first_head = [int(d["heads"].argmin()) for d in draws]

    def state(r: float) -> list[dict]:
        out = []
        for d, h0 in zip(draws, first_head):
            heads = d["heads"] < r
            heads[h0] = True
            values = d["values"] < r
            values[h0, d["values"][h0].argmin()] = True
            out.append({"heads": heads, "values": values, "ffn": d["ffn"] < 0.5 + r / 2, "neurons": d["neurons"] < r})
        return out

    dense = count_macs(describe(gated).dense())
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        set_gate_state(gated, state(mid))
        lo, hi = (mid, hi) if count_macs(gated) / dense < macs_fraction else (lo, mid)
    set_gate_state(gated, state(hi))
    got = count_macs(gated) / dense
    if abs(got - macs_fraction) > 0.005:
        raise ValueError(f"could not reach {macs_fraction:.3f} of dense MACs with this model (got {got:.4f})")
    return state(hi)


def random_width_state(gated: nn.Module, gen: torch.Generator) -> list[dict]:
    """A gate state whose head, value-dim and neuron keep rates are drawn independently (so the fit can
    tell their costs apart); every layer keeps a head with a value dim, an FFN is removed 1 time in 8."""
    keep = torch.rand(3, generator=gen) * 0.9 + 0.1  # heads, value dims, neurons
    state = []
    for attn, mlp in gated_blocks(gated):
        heads = torch.rand(attn.num_heads, generator=gen) < keep[0]
        heads[torch.randint(attn.num_heads, (), generator=gen)] = True
        values = torch.rand(attn.num_heads, attn.head_dim, generator=gen) < keep[1]
        values[:, 0] = True
        neurons = torch.rand(mlp.fc1.out_features, generator=gen) < keep[2]
        state.append({"heads": heads, "values": values, "ffn": bool(torch.rand((), generator=gen) >= 0.125), "neurons": neurons})
    return state


def random_budget_state(gated: nn.Module, gen: torch.Generator) -> list[dict]:
    """`random_feasible_state` at a random MACs fraction in [0.3, 0.95]; a draw whose budget falls in a gap
    (a whole head appearing at once) is redrawn."""
    for _ in range(100):
        fraction = float(torch.empty(()).uniform_(0.3, 0.95, generator=gen))
        try:
            return random_feasible_state(gated, fraction, seed=int(torch.randint(2**31, (), generator=gen)))
        except ValueError:
            continue
    raise RuntimeError("no random budget state found in 100 draws")
