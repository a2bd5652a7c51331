"""Budget-exact mode (beyond the paper): land on a cost target in one run, without a lambda sweep.

The paper reaches a budget by hand-tuning `lambda_macro` and `lambda_micro`. Here their ratio stays
fixed and one overall scale `s` multiplies both: the run solves `min task s.t. cost <= target_t` by dual
ascent on `log s`, driven by the relative overshoot of the cost over the target:

    e = cost / target_t - 1,    I <- I + lr * e  (unless winding up),    s = exp(I + gain * e)

Why the scale must stay small: Adam moves every gate logit at about `gate_lr` per step whatever the
size of its gradient, so `s` decides only *which* gates fall: those whose task gradient is smaller than
`s` times their cost gradient. A scale far above that balance closes every unit at the same speed, and
the order (hence the structure) no longer reads the task. Measured with the previous controller (it
steered the expected cost along a cubic ramp, gain 20): the scale climbed to 474-563 within 19 steps,
17x-440x a neuron's task gradient, then collapsed once the cost undershot, and the rounding decided
301 units.

Which cost: the hardened cost (what is extracted) lags the scale by the tens of steps a logit needs to
cross 0 (`init_logit / gate_lr`), and the expected cost (gate probabilities) is not the extracted one
until the gates polarise. The controller steers the *projected* cost: the hardened cost of the logits
carried forward at their velocity (over the last step, or the mean over `budget_velocity_steps`) to the
`deadline` (a fraction of the search), after it
the hardened cost itself (`projected_fraction`). It reacts at once (the velocities turn with the
scale), it measures what will be extracted, and the steps after the deadline hold the structure at the
target while the temperature anneals and the gates polarise. The scale needed is then the one under
which just enough units are on their way out: the least important ones. Anti-windup (conditional
integration): the integral does not grow while the cost is already falling by `PACE` of its gap per
step (a larger scale moves no gate faster, it only closes important ones too). `round_to_budget` then
flips the least confident gates until the hardened cost is within `tolerance` of the target; the run
records how many it flipped, its largest scale and the expected-vs-hardened gap at the freeze.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .cost import UnitCosts, expected_cost, spec_cost
from .describe import describe
from .gated_vit import gated_blocks, gates
from .quotas import REOPEN_LOGIT, Quotas, closed_among_top, restore_quotas
from .spec import ViTSpec


@dataclass
class BudgetController:
    target: float  # final cost as a fraction of the dense cost (static part included)
    lr: float = 0.1  # integral: step on log(scale) per unit of relative overshoot
    deadline: float = 0.7  # fraction of the search by which the projected structure should be on target
    gain: float = 2.0  # proportional: log(scale) offset per unit of the current relative overshoot
    log_scale: float = 0.0  # the integral part
    overshoot: float = 0.0  # the last relative overshoot
    last_cost: float | None = None  # the cost of the last update: the pace the anti-windup reads
    max_scale: float = 1.0  # the largest scale applied so far

    MAX_LOG_SCALE = 10.0  # keeps exp() finite; s = e^10 outweighs any task loss
    PACE = 0.05  # anti-windup: a cost closing this share of its gap per step keeps pace

    @property
    def scale(self) -> float:
        # the proportional term sees at most a 100% overshoot: a cost 5x its target (a harsh budget at the
        # first step) would otherwise multiply the scale by e^(gain * 4) before any gate could move
        proportional = self.gain * min(max(self.overshoot, -1.0), 1.0)
        return math.exp(min(max(self.log_scale + proportional, -self.MAX_LOG_SCALE), self.MAX_LOG_SCALE))

    def steps_to_deadline(self, steps_done: int, search_steps: int) -> int:
        """How far ahead the projection looks after `steps_done` of `search_steps`: to the deadline, then 0."""
        return max(0, round(self.deadline * search_steps) - steps_done)

    def update(self, cost_fraction: float) -> float:
        """One dual-ascent step from the current cost (fraction of dense); returns the new scale."""
        self.overshoot = cost_fraction / self.target - 1.0
        keeping_pace = self.last_cost is not None and self.last_cost - cost_fraction >= self.PACE * (cost_fraction - self.target)
        if not (self.overshoot > 0 and keeping_pace):
            self.log_scale = min(max(self.log_scale + self.lr * self.overshoot, -self.MAX_LOG_SCALE), self.MAX_LOG_SCALE)
        self.last_cost = cost_fraction
        self.max_scale = max(self.max_scale, self.scale)
        return self.scale

    def state_dict(self) -> dict:
        return {
            "log_scale": self.log_scale,
            "overshoot": self.overshoot,
            "last_cost": self.last_cost,
            "max_scale": self.max_scale,
        }

    def load_state_dict(self, state: dict) -> None:
        self.log_scale, self.overshoot, self.last_cost = float(state["log_scale"]), float(state["overshoot"]), state["last_cost"]
        self.max_scale = float(state["max_scale"])


def budget_step(
    controller: BudgetController,
    gated: nn.Module,
    costs: UnitCosts,
    dense_cost: float,
    steps_done: int,
    search_steps: int,
    past_logits: list[torch.Tensor],
    steps_back: int = 1,
) -> dict:
    """One controller step after optimizer step `steps_done` of the search (`past_logits`: the gates' logits
    `steps_back` steps before it): returns the trajectory row (costs as fractions of dense)."""
    hardened = spec_cost(describe(gated), costs) / dense_cost
    ahead = controller.steps_to_deadline(steps_done, search_steps)
    projected = projected_fraction(gated, costs, dense_cost, past_logits, ahead, steps_back) if ahead else hardened
    scale = controller.update(projected)
    return {
        "progress": steps_done / search_steps,
        "cost_fraction": hardened,
        "expected_fraction": expected_fraction(gated, costs, dense_cost),
        "projected_fraction": projected,
        "target_fraction": controller.target,
        "penalty_scale": scale,
    }


def expected_fraction(gated: nn.Module, costs: UnitCosts, dense_cost: float) -> float:
    """The expected cost of the gate probabilities, as a fraction of the dense cost."""
    with torch.no_grad():
        return float(expected_cost(gated, costs, dense_cost - costs.static).total) / dense_cost


@torch.no_grad()
def projected_fraction(
    gated: nn.Module, costs: UnitCosts, dense_cost: float, past_logits: list, steps_left: int, steps_back: int = 1
) -> float:
    """The hardened cost (fraction of dense) of every logit carried `steps_left` steps on at its mean velocity
    over the last `steps_back` steps (`past_logits`: the logits then, in `gates(gated)` order)."""
    now = [gate.logits.detach().clone() for gate in gates(gated)]
    try:
        for gate, logits, before in zip(gates(gated), now, past_logits):
            gate.logits.data.add_((steps_left / steps_back) * (logits - before))
        return spec_cost(describe(gated), costs) / dense_cost
    finally:
        for gate, logits in zip(gates(gated), now):
            gate.logits.data.copy_(logits)


def finish_budget(
    controller: BudgetController, gated: nn.Module, costs: UnitCosts, dense_cost: float, tolerance: float, quotas: Quotas
) -> dict:
    """At the freeze: give layers below a quota their units back (`restore_quotas`), then round to the target
    (`round_to_budget`), so the budget pays for them. Returns the run's budget metrics: the cost the controller
    landed on before either, how polarised the gates were (hardened vs expected cost), the units restored and
    rounded, and the largest scale used."""
    before = spec_cost(describe(gated), costs) / dense_cost
    expected = expected_fraction(gated, costs, dense_cost)
    restored = restore_quotas(gated, quotas)
    flipped = round_to_budget(gated, costs, controller.target * dense_cost, tolerance, quotas)
    return {
        "unit": costs.unit,
        "target_fraction": controller.target,
        "expected_fraction_at_freeze": expected,
        "cost_fraction_before_rounding": before,
        "hardened_vs_expected_gap": before / expected - 1.0,
        "cost_fraction": spec_cost(describe(gated), costs) / dense_cost,
        "quota_units_restored": restored,
        "rounded_units": flipped,
        "final_penalty_scale": controller.scale,
        "max_penalty_scale": controller.max_scale,
    }


def minimum_cost(spec: ViTSpec, costs: UnitCosts, quotas: Quotas, heads: bool = True, micro: bool = True) -> float:
    """The cheapest architecture the penalties can push to within the quotas: with `heads` (lambda_macro > 0)
    `quotas.heads` heads per layer, else all of them; with `micro` (lambda_micro > 0) `quotas.value_dims` value
    dims per head and every FFN block closed, else every value dim and neuron kept (an unpenalised gate has no
    reason to close)."""
    live_heads = quotas.heads if heads else spec.num_heads
    dims = quotas.value_dims if micro else spec.head_dim
    ffn = 0 if micro else costs.gamma * spec.mlp_hidden_dense
    return costs.static + len(spec.layers) * (live_heads * (costs.alpha + costs.beta * dims) + ffn)


class InfeasibleBudget(ValueError):
    """A cost target the run cannot meet: above dense, below the feasibility floor, or below what the
    penalised gate kinds alone can reach."""


def target_fraction(
    target: float,
    spec: ViTSpec,
    costs: UnitCosts,
    quotas: Quotas,
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
    floor = minimum_cost(spec.dense(), costs, quotas) / dense
    if fraction < floor:
        raise InfeasibleBudget(
            f"{fraction:.4g} of dense is below {floor:.4g}, the smallest model the quotas allow ({quotas.heads} "
            f"heads of {quotas.value_dims} value dims per layer, no FFN: min_heads, min_value_fraction): raise the "
            "target or lower those minimums"
        )
    if not (lambda_macro > 0 and lambda_micro > 0):
        if not (lambda_macro > 0 or lambda_micro > 0):
            raise InfeasibleBudget("needs a penalty to steer: lambda_macro and lambda_micro are both 0")
        penalised = "heads only (lambda_micro = 0)" if lambda_macro > 0 else "value dims and neurons only (lambda_macro = 0)"
        reach = minimum_cost(spec.dense(), costs, quotas, lambda_macro > 0, lambda_micro > 0) / dense
        if fraction < reach:
            raise InfeasibleBudget(
                f"{fraction:.4g} of dense is below {reach:.4g}, the least the penalties can reach when they push "
                f"{penalised}: raise the target to >= {reach:.4g} or give both lambdas a weight"
            )
    return fraction


def _open_dims(attn) -> torch.Tensor:
    """Open value dims per head (hardened)."""
    return attn.value_gate.hard().view(attn.num_heads, attn.head_dim).sum(dim=1)


def _micro_units(blocks: list, costs: UnitCosts, closing: bool, quotas: Quotas) -> list:
    """(confidence, [(gate, index)], cost) of value dims and neurons that may flip in live heads and FFNs: closing
    keeps each head's `quotas.value_dims` and each FFN's `quotas.neurons` most confident units."""
    units = []

    def add(gate: nn.Module, logits, offset: int, unit_cost: float, quota: int) -> None:
        is_open = logits > 0
        if not is_open.any():
            return
        kept = set(map(int, torch.argsort(logits, descending=True, stable=True)[:quota])) if closing else set()
        units.extend(
            (abs(float(logits[i])), [(gate, offset + i)], unit_cost)
            for i in range(len(logits))
            if bool(is_open[i]) == closing and i not in kept
        )

    for attn, mlp in blocks:
        values = attn.value_gate.logits.detach().view(attn.num_heads, attn.head_dim)
        for h in map(int, attn.head_gate.hard().nonzero()):
            add(attn.value_gate, values[h], h * attn.head_dim, costs.beta, quotas.value_dims)
        if mlp.block_gate.hard()[0]:
            add(mlp.neuron_gate, mlp.neuron_gate.logits.detach(), 0, costs.gamma, quotas.neurons)
    return units


def _head_units(blocks: list, costs: UnitCosts, closing: bool, quotas: Quotas) -> list:
    """(confidence, [(gate, index)], cost) of whole heads that may flip: over budget each layer keeps its
    `quotas.heads` most confident live heads; a reopened head brings its value dims up to `quotas.value_dims`."""
    units = []
    for attn, _ in blocks:
        logits, dims = attn.head_gate.logits.detach(), _open_dims(attn)
        alive = attn.head_gate.hard() & (dims > 0)  # an open head without value dims costs nothing already
        if closing:
            live = sorted(map(int, alive.nonzero()), key=lambda h: -float(logits[h]))
            units.extend(
                (abs(float(logits[h])), [(attn.head_gate, h)], costs.alpha + costs.beta * int(dims[h]))
                for h in live[quotas.heads :]
            )
        else:
            values = attn.value_gate.logits.detach().view(attn.num_heads, attn.head_dim)
            for h in map(int, (~alive).nonzero()):
                flips = [(attn.head_gate, h)] if not attn.head_gate.hard()[h] else []
                flips += [(attn.value_gate, h * attn.head_dim + i) for i in closed_among_top(values[h], quotas.value_dims)]
                units.append((abs(float(logits[h])), flips, costs.alpha + costs.beta * max(int(dims[h]), quotas.value_dims)))
    return units


def _ffn_units(blocks: list, costs: UnitCosts, quotas: Quotas) -> list:
    """(confidence, [(gate, index)], cost) of FFNs that cost nothing now (block closed, or open without a
    neuron) to bring back: a reopened FFN keeps its open neurons, brought up to `quotas.neurons`."""
    units = []
    for _, mlp in blocks:
        is_open, neurons = bool(mlp.block_gate.hard()[0]), mlp.neuron_gate.logits.detach()
        alive = int((neurons > 0).sum())
        if is_open and alive:
            continue
        flips = [] if is_open else [(mlp.block_gate, 0)]
        flips += [(mlp.neuron_gate, i) for i in closed_among_top(neurons, quotas.neurons)]
        confidence = abs(float(mlp.block_gate.logits.detach()[0] if not is_open else neurons.max()))
        units.append((confidence, flips, costs.gamma * max(alive, quotas.neurons)))
    return units


def _ffn_block_units(blocks: list, costs: UnitCosts) -> list:
    """(confidence, [(gate, index)], cost) of live FFN blocks, to close whole: the coarsest step over budget."""
    units = []
    for _, mlp in blocks:
        neurons = int(mlp.hard_neuron_mask().sum())
        if mlp.hard_block_open() and neurons:
            units.append((abs(float(mlp.block_gate.logits.detach()[0])), [(mlp.block_gate, 0)], costs.gamma * neurons))
    return units


def round_to_budget(gated: nn.Module, costs: UnitCosts, target: float, tolerance: float, quotas: Quotas) -> int:
    """Flip the least confident gates (logits nearest 0) until the hardened cost (absolute, `costs` units)
    is within `tolerance` (relative) of `target`, never below a quota; returns the number of units flipped.

    Fine steps first (value dims and neurons of live heads and FFNs, down to their quotas), then whole heads
    (each layer keeps its `quotas.heads` most confident), then whole FFN blocks: first the coarse steps fine
    steps can come back from within the tolerance, then any. A reopened head or FFN block gets its quota of
    units back; fine steps follow each coarse step, and a reopening they cannot pay for is closed again. The cost
    ends at most `tolerance` above the target (or at the quotas' floor), within one fine step below it."""
    blocks = gated_blocks(gated)
    cost = spec_cost(describe(gated), costs)
    flipped = 0

    def flip(units: list, closing: bool, fine: bool = False, may_strand: bool = True) -> None:
        nonlocal cost, flipped
        for _, flips, unit_cost in sorted(units, key=lambda u: u[0]):
            if (cost <= target) if closing else (cost >= target):
                return
            if fine and not closing and cost + unit_cost > target * (1 + tolerance):
                continue  # a fine step up never breaks the budget (a coarse one may: fine steps then close back)
            before = [float(gate.logits.data[index]) for gate, index in flips]
            for gate, index in flips:  # just across the threshold: these were the least sure units
                gate.logits.data[index] = -REOPEN_LOGIT if closing else REOPEN_LOGIT
            if not may_strand and cost - unit_cost + fine_steps_up() < target * (1 - tolerance):
                for (gate, index), logit in zip(flips, before):  # fine steps could not come back within the tolerance
                    gate.logits.data[index] = logit
                continue
            cost += -unit_cost if closing else unit_cost
            flipped += 1

    def fine_steps_up() -> float:
        return sum(unit_cost for _, _, unit_cost in _micro_units(blocks, costs, False, quotas))

    def within() -> bool:
        return abs(cost / target - 1.0) <= tolerance

    def fine_steps_back() -> None:
        if not within():
            flip(_micro_units(blocks, costs, cost > target, quotas), cost > target, fine=True)

    def close_coarse(may_strand: bool) -> None:
        for coarse in (lambda: _head_units(blocks, costs, True, quotas), lambda: _ffn_block_units(blocks, costs)):
            if not within() and cost > target:
                flip(coarse(), True, may_strand=may_strand)
                fine_steps_back()

    closing = cost > target
    if not within():
        flip(_micro_units(blocks, costs, closing, quotas), closing, fine=True)
    if not within() and not closing and cost < target:  # under budget, fine steps spent: empty FFNs, then heads
        flip(_ffn_units(blocks, costs, quotas), False)
        fine_steps_back()
        if not within() and cost < target:
            flip(_head_units(blocks, costs, False, quotas), False)
            fine_steps_back()
    # over budget (from the start, or after a reopening fine steps could not pay for): whole heads, then FFN blocks,
    # first those the fine steps can bring back within the tolerance, then any
    close_coarse(may_strand=False)
    close_coarse(may_strand=True)
    return flipped
