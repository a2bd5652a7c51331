"""The feasibility quotas as counts, held by the model that is extracted, not only by the gate probabilities.

`losses.feasibility_penalty` asks for `sum p(head) >= min_heads` and for mean probabilities above the
fractions: three heads at p ~0.34 satisfy it and all three harden closed (measured: a layer of
hiap_harsh_s0 lost every head with `min_heads: 1`). So at the freeze `restore_quotas` gives every layer
below a quota back its most confident units, the budget rounding then pays for them and keeps them, and
`quota_shortfalls` names whatever still falls short. The quotas, per layer of the hardened model:

- at least `ceil(min_heads)` live heads (a head is live when its gate is open and it keeps a value dim);
- every live head at least `ceil(min_value_fraction * head_dim)` value dims (at least one);
- every live FFN block (gate open, a neuron kept) at least `ceil(min_neuron_fraction * hidden)` neurons.

An FFN block may close whole, and with `min_heads: 0` so may a layer's attention: depth pruning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .gated_vit import gated_blocks
from .spec import ViTSpec

REOPEN_LOGIT = 1e-3  # just across the threshold: the unit was the least sure of its side


def _at_least(fraction: float, total: int) -> int:
    """`ceil(fraction * total)`, forgiving the float error of products such as 0.1 * 30 = 3.0000000000000004."""
    return math.ceil(fraction * total - 1e-9)


@dataclass(frozen=True)
class Quotas:
    heads: int  # live heads per layer
    value_dims: int  # value dims per live head
    neurons: int  # neurons per live FFN block

    @classmethod
    def of(cls, spec: ViTSpec, min_heads: float, min_value_fraction: float, min_neuron_fraction: float) -> Quotas:
        """The counts for a model of `spec`'s dimensions under the run's `hiap.min_*` params."""
        if not 0 <= min_heads <= spec.num_heads:
            raise ValueError(f"min_heads must be in [0, {spec.num_heads}] (heads per layer), got {min_heads}")
        for name, value in (("min_value_fraction", min_value_fraction), ("min_neuron_fraction", min_neuron_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        return cls(
            heads=_at_least(min_heads, 1),
            value_dims=max(1, _at_least(min_value_fraction, spec.head_dim)),
            neurons=max(1, _at_least(min_neuron_fraction, spec.mlp_hidden_dense)),
        )


def closed_among_top(logits: torch.Tensor, wanted: int) -> list[int]:
    """Indices of the closed units among the `wanted` most confident (highest logit) of `logits`."""
    order = torch.argsort(logits, descending=True, stable=True)[:wanted]
    return [int(i) for i in order if logits[i] <= 0]


def _layer_reopenings(attn, mlp, quotas: Quotas) -> list[tuple[nn.Parameter, int]]:
    """(logits, index) of the units one layer needs back to meet the quotas, most confident first."""
    heads, values = attn.head_gate.logits.detach(), attn.value_gate.logits.detach().view(attn.num_heads, attn.head_dim)
    dims = (values > 0).sum(dim=1)
    live = [h for h in range(attn.num_heads) if heads[h] > 0 and dims[h] > 0]
    dead = sorted((h for h in range(attn.num_heads) if h not in live), key=lambda h: -float(heads[h]))
    flips = []
    for h in live + dead[: max(0, quotas.heads - len(live))]:
        if heads[h] <= 0:
            flips.append((attn.head_gate.logits, h))
        flips.extend((attn.value_gate.logits, h * attn.head_dim + i) for i in closed_among_top(values[h], quotas.value_dims))
    neurons = mlp.neuron_gate.logits.detach()
    if mlp.block_gate.logits.detach()[0] > 0 and (neurons > 0).any():
        flips.extend((mlp.neuron_gate.logits, i) for i in closed_among_top(neurons, quotas.neurons))
    return flips


@torch.no_grad()
def restore_quotas(gated: nn.Module, quotas: Quotas) -> int:
    """Give every layer below a quota its most confident closed units back (logit just above 0): heads by their
    head logit, then value dims and neurons by theirs. Returns the number of units reopened."""
    reopened = 0
    for attn, mlp in gated_blocks(gated):
        for logits, index in _layer_reopenings(attn, mlp, quotas):
            logits.data[index] = REOPEN_LOGIT
            reopened += 1
    return reopened


def quota_shortfalls(gated: nn.Module, quotas: Quotas) -> list[str]:
    """One line per layer of the hardened gated model that falls short of a quota (empty when all hold)."""
    lines = []
    for layer, (attn, mlp) in enumerate(gated_blocks(gated)):
        dims = attn.hard_value_mask().sum(dim=1)
        live = dims[dims > 0]
        if len(live) < quotas.heads:
            lines.append(f"layer {layer}: {len(live)} live heads, min_heads asks for {quotas.heads}")
        if len(live) and int(live.min()) < quotas.value_dims:
            lines.append(
                f"layer {layer}: a head keeps {int(live.min())} value dims, min_value_fraction asks for {quotas.value_dims}"
            )
        neurons = int(mlp.hard_neuron_mask().sum()) if mlp.hard_block_open() else 0
        if 0 < neurons < quotas.neurons:
            lines.append(f"layer {layer}: its FFN keeps {neurons} neurons, min_neuron_fraction asks for {quotas.neurons}")
    return lines
