"""Budget-exact mode (beyond the paper): land on a cost target in one run, without a lambda sweep.

The paper reaches a budget by hand-tuning `lambda_macro` and `lambda_micro`. Here their ratio stays
fixed and one overall scale `s` multiplies both: the run solves `min task s.t. cost <= target` by dual
ascent on `log s`, driven by the relative overshoot of the hardened cost (what is finally extracted):

    log s <- log s + lr * (cost / target_t - 1)

`s = exp(log s)` stays positive; it grows while the model is over budget and shrinks once it is under,
so the task loss reopens units it needs and the cost settles on the target from either side. The
target itself falls from dense to its final value over the first `ramp` of training (cubic, as in
gradual magnitude pruning), so the controller tracks a slowly moving target instead of a step. The
controller gets the run to about the target; `round_to_budget` then closes or opens the least
confident micro units (value dims, neurons: logits nearest 0) if the hardened cost is still further
than `tolerance` from it, which makes the +-1% guarantee exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .arch import ViTSpec, describe
from .cost import UnitCosts, spec_cost


@dataclass
class BudgetController:
    target: float  # final cost as a fraction of the dense cost (static part included)
    lr: float = 0.1  # step on log(scale) per unit of relative overshoot
    ramp: float = 0.5  # fraction of training over which the target falls from 1 to `target`
    log_scale: float = 0.0

    MAX_LOG_SCALE = 10.0  # keeps exp() finite; s = e^10 outweighs any task loss

    @property
    def scale(self) -> float:
        return math.exp(self.log_scale)

    def target_at(self, progress: float) -> float:
        """The moving target at `progress` in [0, 1] of training."""
        if self.ramp <= 0:
            return self.target
        left = 1.0 - min(max(progress, 0.0) / self.ramp, 1.0)
        return self.target + (1.0 - self.target) * left**3

    def update(self, cost_fraction: float, progress: float) -> float:
        """One dual-ascent step from the current hardened cost (fraction of dense); returns the new scale."""
        overshoot = cost_fraction / self.target_at(progress) - 1.0
        self.log_scale = min(max(self.log_scale + self.lr * overshoot, -self.MAX_LOG_SCALE), self.MAX_LOG_SCALE)
        return self.scale

    def state_dict(self) -> dict:
        return {"log_scale": self.log_scale}

    def load_state_dict(self, state: dict) -> None:
        self.log_scale = float(state["log_scale"])


def minimum_cost(spec: ViTSpec, costs: UnitCosts, min_heads: float, min_value_fraction: float) -> float:
    """The cheapest architecture the feasibility minimums allow: `ceil(min_heads)` heads per layer with
    `ceil(min_value_fraction * head_dim)` value dims each (at least one), every FFN removed."""
    heads = math.ceil(min_heads)
    dims = max(1, math.ceil(min_value_fraction * spec.head_dim))
    return costs.static + len(spec.layers) * heads * (costs.alpha + costs.beta * dims)


def round_to_budget(gated: nn.Module, costs: UnitCosts, target: float, tolerance: float, min_heads: float = 1) -> int:
    """Flip the least confident gates (logits nearest 0) until the hardened cost (absolute, `costs` units)
    is within `tolerance` (relative) of `target`; returns the number of units flipped.

    Over budget: close open value dims and neurons, then, if those run out, whole heads (each layer keeps
    its `ceil(min_heads)` most confident ones); under budget (at first or after closing heads): open closed
    value dims and neurons. Every live head and FFN keeps its most confident unit, so the cost stays the
    linear sum the controller steered, and the result is within one value dim or neuron of the target."""
    from .gated_vit import gated_blocks

    blocks = gated_blocks(gated)
    cost = spec_cost(describe(gated), costs)
    flipped = 0

    def micro_units(closing: bool) -> list:
        """(confidence, gate, index, cost) of the value dims and neurons that could flip in live structures."""
        units = []

        def add(gate: nn.Module, logits, offset: int, unit_cost: float) -> None:
            is_open = logits > 0
            if not is_open.any():
                return
            keep = int(logits.argmax())  # closing never empties a head or an FFN
            units.extend((abs(float(logits[i])), gate, offset + i, unit_cost)
                         for i in range(len(logits)) if bool(is_open[i]) == closing and not (closing and i == keep))

        for attn, mlp in blocks:
            values = attn.value_gate.logits.detach().view(attn.num_heads, attn.head_dim)
            for h in map(int, attn.head_gate.hard().nonzero()):
                add(attn.value_gate, values[h], h * attn.head_dim, costs.beta)
            if mlp.block_gate.hard()[0]:
                add(mlp.neuron_gate, mlp.neuron_gate.logits.detach(), 0, costs.gamma)
        return units

    def heads() -> list:
        units = []
        for attn, _ in blocks:
            logits = attn.head_gate.logits.detach()
            open_dims = attn.value_gate.hard().view(attn.num_heads, attn.head_dim).sum(dim=1)
            alive = attn.head_gate.hard() & (open_dims > 0)  # an open head without value dims costs nothing already
            live = sorted(map(int, alive.nonzero()), key=lambda h: -float(logits[h]))
            units.extend((float(logits[h]), attn.head_gate, h, costs.alpha + costs.beta * int(open_dims[h]))
                         for h in live[max(1, math.ceil(min_heads)):])
        return units

    def flip(units: list, closing: bool) -> None:
        nonlocal cost, flipped
        for _, gate, index, unit_cost in sorted(units, key=lambda u: u[0]):
            if (cost <= target) if closing else (cost >= target):
                return
            gate.logits.data[index] = -1e-3 if closing else 1e-3  # just across the threshold: the least sure units
            cost += -unit_cost if closing else unit_cost
            flipped += 1

    def within() -> bool:
        return abs(cost / target - 1.0) <= tolerance

    if not within() and cost > target:
        flip(micro_units(closing=True), closing=True)
        if not within() and cost > target:
            flip(heads(), closing=True)
    if not within() and cost < target:
        flip(micro_units(closing=False), closing=False)
    return flipped
