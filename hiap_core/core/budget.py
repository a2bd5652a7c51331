"""Budget-exact mode (beyond the paper): land on a cost target in one run, without a lambda sweep.

The paper reaches a budget by hand-tuning `lambda_macro` and `lambda_micro`. Here their ratio stays
fixed and one overall scale `s` multiplies both: the run solves `min task s.t. cost <= target` by dual
ascent on `log s`, driven by the relative overshoot of the cost:

    e = cost / target_t - 1,    I <- I + lr * e,    s = exp(I + gain * e)

`s` stays positive; it grows while the model is over budget and shrinks once it is under. The
proportional term matters: Adam moves every gate logit at about `gate_lr` per step whatever the size
of its gradient, so the scale only decides which gates still fall, and the cost keeps falling until the
scale drops below what the task gradient of the remaining units outweighs. An integral alone drops it
far too slowly (measured: target 0.67, expected cost fell on to 0.60); `gain * e` drops it at once, so
units reopen and the cost hovers at the target.
Which cost: the hardened cost (what is extracted) moves in steps and lags the logits by the tens of
steps a gate needs to reach 0, and a gate once closed hardly reopens, so steering on it winds the
scale up and overshoots for good (measured: target 0.67, landed at 0.56). The controller therefore
steers on the expected cost (gate probabilities, smooth and without lag) and hands over to the
hardened cost linearly after the ramp, by which time the gates have polarised and the two agree to a
few percent. The target falls from the starting cost to its final value over the first `ramp` of
training (cubic, as in gradual magnitude pruning). `round_to_budget` then flips the least confident
gates until the hardened cost is within `tolerance` of the target, which makes the +-1% guarantee exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .cost import UnitCosts, expected_cost, spec_cost
from .describe import describe
from .gated_vit import gated_blocks
from .spec import ViTSpec


@dataclass
class BudgetController:
    target: float  # final cost as a fraction of the dense cost (static part included)
    lr: float = 0.1  # integral: step on log(scale) per unit of relative overshoot
    ramp: float = 0.5  # fraction of training over which the target falls from `start` to `target`
    gain: float = 20.0  # proportional: log(scale) offset per unit of the current relative overshoot
    log_scale: float = 0.0  # the integral part
    start: float | None = None  # the cost the ramp starts from: the first one observed
    overshoot: float = 0.0  # the last relative overshoot

    MAX_LOG_SCALE = 10.0  # keeps exp() finite; s = e^10 outweighs any task loss

    @property
    def scale(self) -> float:
        return math.exp(min(max(self.log_scale + self.gain * self.overshoot, -self.MAX_LOG_SCALE), self.MAX_LOG_SCALE))

    def target_at(self, progress: float) -> float:
        """The moving target at `progress` in [0, 1] of training."""
        start = max(self.start if self.start is not None else 1.0, self.target)
        if self.ramp <= 0:
            return self.target
        left = 1.0 - min(max(progress, 0.0) / self.ramp, 1.0)
        return self.target + (start - self.target) * left**3

    def update(self, cost_fraction: float, progress: float) -> float:
        """One dual-ascent step from the current cost (fraction of dense); returns the new scale."""
        if self.start is None:
            self.start = cost_fraction
        self.overshoot = cost_fraction / self.target_at(progress) - 1.0
        self.log_scale = min(max(self.log_scale + self.lr * self.overshoot, -self.MAX_LOG_SCALE), self.MAX_LOG_SCALE)
        return self.scale

    def hardened_weight(self, progress: float) -> float:
        """How much the steered cost is the hardened one (vs the expected one): 0 until the ramp ends, then linear to 1."""
        return min(max((progress - self.ramp) / (1.0 - self.ramp), 0.0), 1.0)

    def state_dict(self) -> dict:
        return {"log_scale": self.log_scale, "start": self.start, "overshoot": self.overshoot}

    def load_state_dict(self, state: dict) -> None:
        self.log_scale, self.start, self.overshoot = float(state["log_scale"]), state["start"], float(state["overshoot"])


def budget_step(controller: BudgetController, gated: nn.Module, costs: UnitCosts, dense_cost: float, progress: float) -> dict:
    """One controller step after an optimizer step: returns the trajectory row (costs as fractions of dense)."""
    hardened = spec_cost(describe(gated), costs) / dense_cost
    with torch.no_grad():
        expected = float(expected_cost(gated, costs, dense_cost - costs.static).total) / dense_cost
    weight = controller.hardened_weight(progress)
    steered = (1.0 - weight) * expected + weight * hardened
    scale = controller.update(steered, progress)
    return {
        "progress": progress,
        "cost_fraction": hardened,
        "expected_fraction": expected,
        "steered_fraction": steered,
        "target_fraction": controller.target_at(progress),
        "penalty_scale": scale,
    }


def finish_budget(
    controller: BudgetController, gated: nn.Module, costs: UnitCosts, dense_cost: float, tolerance: float, min_heads: float
) -> dict:
    """Round the trained gates to the target (`round_to_budget`); returns the run's budget metrics."""
    before = spec_cost(describe(gated), costs) / dense_cost
    flipped = round_to_budget(gated, costs, controller.target * dense_cost, tolerance, min_heads)
    return {
        "unit": costs.unit,
        "target_fraction": controller.target,
        "cost_fraction_before_rounding": before,
        "cost_fraction": spec_cost(describe(gated), costs) / dense_cost,
        "rounded_units": flipped,
        "final_penalty_scale": controller.scale,
    }


def minimum_cost(
    spec: ViTSpec, costs: UnitCosts, min_heads: float, min_value_fraction: float, heads: bool = True, micro: bool = True
) -> float:
    """The cheapest architecture the penalties can push to within the feasibility minimums: with `heads`
    (lambda_macro > 0) `ceil(min_heads)` heads per layer, else all of them; with `micro` (lambda_micro > 0)
    `ceil(min_value_fraction * head_dim)` value dims per head (at least one) and every FFN removed, else
    every value dim and neuron kept (an unpenalised gate has no reason to close)."""
    live_heads = math.ceil(min_heads) if heads else spec.num_heads
    dims = max(1, math.ceil(min_value_fraction * spec.head_dim)) if micro else spec.head_dim
    ffn = 0 if micro else costs.gamma * spec.mlp_hidden_dense
    return costs.static + len(spec.layers) * (live_heads * (costs.alpha + costs.beta * dims) + ffn)


class InfeasibleBudget(ValueError):
    """A cost target the run cannot meet: above dense, below the feasibility floor, or below what the
    penalised gate kinds alone can reach."""


def target_fraction(
    target: float,
    spec: ViTSpec,
    costs: UnitCosts,
    min_heads: float,
    min_value_fraction: float,
    lambda_macro: float = 1.0,
    lambda_micro: float = 1.0,
) -> float:
    """`target` (a fraction of the dense cost if <= 1, else an absolute cost in `costs.unit`) as a fraction
    of the dense cost; InfeasibleBudget when the run cannot meet it (so it fails before training, not after).

    With one lambda at 0 only the other kind of gate is pushed: a target below what that kind can reach
    would wind the penalty scale up until it overwhelms the feasibility penalties (measured: macro-only at
    0.5 of dense closed every head, scale 9300, 10% accuracy) and leave the rest to rounding."""
    dense = spec_cost(spec.dense(), costs)
    if not target > 0:
        raise InfeasibleBudget("must be > 0: a fraction of the dense cost (<= 1) or an absolute cost (> 1)")
    fraction = target if target <= 1 else target / dense
    if fraction > 1:
        raise InfeasibleBudget(f"above the dense model's {dense:,.0f} {costs.unit}; a budget must be at most the dense cost")
    floor = minimum_cost(spec.dense(), costs, min_heads, min_value_fraction) / dense
    if fraction < floor:
        raise InfeasibleBudget(
            f"{fraction:.4g} of dense is below {floor:.4g}, the smallest model the feasibility minimums allow "
            "(min_heads heads x min_value_fraction value dims per layer, no FFN): raise the target or "
            "lower those minimums"
        )
    if not (lambda_macro > 0 and lambda_micro > 0):
        if not (lambda_macro > 0 or lambda_micro > 0):
            raise InfeasibleBudget("needs a penalty to steer: lambda_macro and lambda_micro are both 0")
        penalised = "heads only (lambda_micro = 0)" if lambda_macro > 0 else "value dims and neurons only (lambda_macro = 0)"
        reach = minimum_cost(spec.dense(), costs, min_heads, min_value_fraction, lambda_macro > 0, lambda_micro > 0) / dense
        if fraction < reach:
            raise InfeasibleBudget(
                f"{fraction:.4g} of dense is below {reach:.4g}, the least the penalties can reach when they push "
                f"{penalised}: raise the target to >= {reach:.4g} or give both lambdas a weight"
            )
    return fraction


def _open_dims(attn) -> torch.Tensor:
    """Open value dims per head (hardened)."""
    return attn.value_gate.hard().view(attn.num_heads, attn.head_dim).sum(dim=1)


def _micro_units(blocks: list, costs: UnitCosts, closing: bool) -> list:
    """(confidence, [(gate, index)], cost) of value dims and neurons that may flip in live structures."""
    units = []

    def add(gate: nn.Module, logits, offset: int, unit_cost: float) -> None:
        is_open = logits > 0
        if not is_open.any():
            return
        keep = int(logits.argmax())  # closing never empties a head or an FFN
        units.extend(
            (abs(float(logits[i])), [(gate, offset + i)], unit_cost)
            for i in range(len(logits))
            if bool(is_open[i]) == closing and not (closing and i == keep)
        )

    for attn, mlp in blocks:
        values = attn.value_gate.logits.detach().view(attn.num_heads, attn.head_dim)
        for h in map(int, attn.head_gate.hard().nonzero()):
            add(attn.value_gate, values[h], h * attn.head_dim, costs.beta)
        if mlp.block_gate.hard()[0]:
            add(mlp.neuron_gate, mlp.neuron_gate.logits.detach(), 0, costs.gamma)
    return units


def _head_units(blocks: list, costs: UnitCosts, closing: bool, min_heads: float) -> list:
    """(confidence, [(gate, index)], cost) of whole heads that may flip: over budget each layer keeps its
    `ceil(min_heads)` most confident live heads; a reopened head brings back a value dim if it has none."""
    units = []
    for attn, _ in blocks:
        logits, dims = attn.head_gate.logits.detach(), _open_dims(attn)
        alive = attn.head_gate.hard() & (dims > 0)  # an open head without value dims costs nothing already
        if closing:
            live = sorted(map(int, alive.nonzero()), key=lambda h: -float(logits[h]))
            units.extend(
                (abs(float(logits[h])), [(attn.head_gate, h)], costs.alpha + costs.beta * int(dims[h]))
                for h in live[max(1, math.ceil(min_heads)) :]
            )
        else:
            values = attn.value_gate.logits.detach().view(attn.num_heads, attn.head_dim)
            for h in map(int, (~alive).nonzero()):
                flips = [(attn.head_gate, h)] if not attn.head_gate.hard()[h] else []
                if dims[h] == 0:  # bring back its most confident value dim
                    flips.append((attn.value_gate, h * attn.head_dim + int(values[h].argmax())))
                units.append((abs(float(logits[h])), flips, costs.alpha + costs.beta * max(int(dims[h]), 1)))
    return units


def _ffn_units(blocks: list, costs: UnitCosts) -> list:
    """(confidence, [(gate, index)], cost) of FFNs that cost nothing now (block closed, or open without a
    neuron) to bring back: a closed block reopens with its open neurons, or its most confident one."""
    units = []
    for _, mlp in blocks:
        is_open, neurons = bool(mlp.block_gate.hard()[0]), mlp.neuron_gate.logits.detach()
        alive = int((neurons > 0).sum())
        if is_open and alive:
            continue
        flips = ([] if is_open else [(mlp.block_gate, 0)]) + ([] if alive else [(mlp.neuron_gate, int(neurons.argmax()))])
        confidence = abs(float(mlp.block_gate.logits.detach()[0] if not is_open else neurons.max()))
        units.append((confidence, flips, costs.gamma * max(alive, 1)))
    return units


def round_to_budget(gated: nn.Module, costs: UnitCosts, target: float, tolerance: float, min_heads: float = 1) -> int:
    """Flip the least confident gates (logits nearest 0) until the hardened cost (absolute, `costs` units)
    is within `tolerance` (relative) of `target`; returns the number of units flipped.

    Value dims and neurons of live heads and FFNs go first (fine steps); whole heads only when those run
    out: over budget, each layer keeps its `ceil(min_heads)` most confident live heads; under budget, a
    reopened head brings back its open value dims (or its most confident one), and a reopened FFN block its
    open neurons (or its most confident one), least confident first. Every live head and FFN
    keeps a unit, so the cost stays the linear sum the controller steered, and the result lands within
    one value dim or neuron of the target unless every unit in that direction is spent."""
    blocks = gated_blocks(gated)
    cost = spec_cost(describe(gated), costs)
    flipped = 0

    def flip(units: list, closing: bool) -> None:
        nonlocal cost, flipped
        for _, flips, unit_cost in sorted(units, key=lambda u: u[0]):
            if (cost <= target) if closing else (cost >= target):
                return
            for gate, index in flips:  # just across the threshold: these were the least sure units
                gate.logits.data[index] = -1e-3 if closing else 1e-3
            cost += -unit_cost if closing else unit_cost
            flipped += 1

    def within() -> bool:
        return abs(cost / target - 1.0) <= tolerance

    closing = cost > target
    if not within():
        flip(_micro_units(blocks, costs, closing), closing)
    if not within() and not closing and cost < target:  # under budget, fine steps spent: empty FFNs, then neurons
        flip(_ffn_units(blocks, costs), False)
        if not within():
            flip(_micro_units(blocks, costs, cost > target), cost > target)
    if not within() and (cost > target) == closing:  # still short: whole heads, then fine steps back
        flip(_head_units(blocks, costs, closing, min_heads), closing)
        if not within():
            flip(_micro_units(blocks, costs, cost > target), cost > target)
    return flipped
