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


def round_to_budget(gated: nn.Module, costs: UnitCosts, target: float, tolerance: float) -> int:
    """If the hardened cost is further than `tolerance` (relative) from `target` (absolute cost), close
    (or open) the open (closed) value dims and neurons of live heads and FFNs whose logits are nearest 0,
    one at a time, until the cost crosses the target. Every live head and FFN keeps its most confident
    unit, so no structure appears or disappears and the linear cost stays exact. Returns the number of units flipped."""
    from .gated_vit import gated_blocks

    cost = spec_cost(describe(gated), costs)
    if abs(cost / target - 1.0) <= tolerance:
        return 0
    closing = cost > target
    candidates = []  # (logit, gate, flat index, unit cost)

    def add(gate: nn.Module, logits, offset: int, unit_cost: float) -> None:
        is_open = logits > 0
        if not is_open.any():
            return
        keep = int(logits.argmax())  # closing never empties a head or an FFN
        candidates.extend((float(logits[i]), gate, offset + i, unit_cost)
                          for i in range(len(logits)) if bool(is_open[i]) == closing and not (closing and i == keep))

    for attn, mlp in gated_blocks(gated):
        values = attn.value_gate.logits.detach().view(attn.num_heads, attn.head_dim)
        for h in map(int, attn.head_gate.hard().nonzero()):
            add(attn.value_gate, values[h], h * attn.head_dim, costs.beta)
        if mlp.block_gate.hard()[0]:
            add(mlp.neuron_gate, mlp.neuron_gate.logits.detach(), 0, costs.gamma)
    candidates.sort(key=lambda c: abs(c[0]))
    flipped = 0
    for _, gate, index, unit_cost in candidates:
        if (cost <= target) if closing else (cost >= target):
            break
        gate.logits.data[index] = -1e-3 if closing else 1e-3  # just across the threshold: the least sure units
        cost += -unit_cost if closing else unit_cost
        flipped += 1
    return flipped
