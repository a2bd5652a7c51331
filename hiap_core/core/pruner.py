"""`Pruner`: HiAP in any training loop. It holds what a HiAP run needs besides the task loss: the gated
model, the temperature per step, the cost penalties and feasibility terms, budget-exact control, and
hardening with extraction at the end (hiap_core/DESIGN.md, "Pruner"). The training engine uses it too.

    pruner = hiap_core.Pruner(model, total_steps=epochs * len(loader), target=0.5)  # or lambdas, no target
    optimizer = torch.optim.AdamW(pruner.param_groups(lr=5e-4, weight_decay=0.05, gate_lr=0.05))
    for step, (x, y) in enumerate(batches):
        pruner.set_step(step)                                    # gate temperature
        loss = pruner.loss(F.cross_entropy(model(x), y))["loss"]  # + penalties
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        pruner.after_step(step)                                  # budget control (no-op without a target)
    small = pruner.finish()                                      # round to the budget, harden, extract
"""

from __future__ import annotations

import math
import numbers
from collections import deque

import torch
from torch import nn

from .budget import BudgetController, budget_step, finish_budget, target_fraction
from .cost import UnitCosts, expected_cost, spec_cost, unit_costs
from .describe import describe
from .extract import extract
from .gated_vit import (
    GATE_FORWARDS,
    GateConfig,
    freeze_gates,
    gate_parameters,
    gate_vit,
    gated_blocks,
    gates,
    is_gated,
    macro_gate_parameters,
    set_gate_forward,
    set_temperature,
)
from .losses import cost_penalties, feasibility_penalty, temperature_at
from .polarisation import polarisation, undecided_term
from .quotas import Quotas, quota_shortfalls, restore_quotas
from .pruned import PrunedViT


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, gate_lr: float | None = None, macro_gate_lr_scale: float = 1.0
) -> list[dict]:
    """Optimizer groups: weight decay on matrices only (not norms, biases, embeddings or tokens); gate
    logits in their own group (`"gates": True`) at `gate_lr` without decay, the macro gates' (heads, FFN
    blocks) in a second one at `macro_gate_lr_scale * gate_lr` when that scale is not 1."""
    if not (_finite_number(macro_gate_lr_scale) and macro_gate_lr_scale > 0):
        raise ValueError(f"macro_gate_lr_scale must be a finite number > 0, got {macro_gate_lr_scale!r}")
    gates = gate_parameters(model)
    gate_ids = {id(p) for p in gates}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) in gate_ids or not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.split(".")[-1] in ("pos_embed", "cls_token", "reg_token")
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr}, {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    if gates:
        if gate_lr is None:
            raise ValueError("the model is gated: param_groups needs gate_lr, the learning rate of the gate logits")
        macro_ids = {id(p) for p in macro_gate_parameters(model)} if macro_gate_lr_scale != 1 else set()
        micro = [p for p in gates if id(p) not in macro_ids]
        macro = [p for p in gates if id(p) in macro_ids]
        groups.append({"params": micro, "weight_decay": 0.0, "lr": gate_lr, "gates": True})
        if macro:
            groups.append({"params": macro, "weight_decay": 0.0, "lr": macro_gate_lr_scale * gate_lr, "gates": True})
    return groups


def _finite_number(value) -> bool:
    """A finite real number: Python's or numpy's (`np.float32`, `np.int64`), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_numbers(weights: dict, minimums: dict, schedule: dict) -> None:
    """Every argument a finite number; weights and minimums >= 0, `init_logit` > 0 (every gate starts open)."""
    for name, value in {**weights, **minimums, **schedule}.items():
        if not _finite_number(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    for name, value in {**weights, **minimums}.items():
        if value < 0 or (name == "init_logit" and value == 0):
            raise ValueError(f"{name} must be {'> 0 (every gate starts open)' if name == 'init_logit' else '>= 0'}, got {value}")


def _check_schedule(total_steps, search_fraction, gate_forward, velocity_steps) -> None:
    """The step counts and the gate forward, before the model is touched."""
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps}")
    if isinstance(velocity_steps, bool) or int(velocity_steps) != velocity_steps or velocity_steps < 1:
        raise ValueError(f"budget_velocity_steps must be an integer >= 1, got {velocity_steps!r}")
    if not 0 < search_fraction <= 1:
        raise ValueError(f"search_fraction must be in (0, 1], got {search_fraction}")
    if gate_forward not in GATE_FORWARDS:
        raise ValueError(f"gate forward must be one of {', '.join(GATE_FORWARDS)}, got {gate_forward!r}")


def _gated(model: nn.Module, init_logit: float | None, tau: float) -> nn.Module:
    """`model` gated in place (`init_logit` None: `GateConfig`'s); one gated already is taken as it is."""
    if not is_gated(model):
        return gate_vit(model, init_logit=GateConfig().init_logit if init_logit is None else init_logit, tau=tau)
    if init_logit is not None:
        raise ValueError(
            "init_logit sets the gates the Pruner adds, but this model is already gated (its logits are kept): "
            "pass the dense model, or leave init_logit unset"
        )
    return model


def _target_fraction(target, spec, costs: UnitCosts, quotas: Quotas, lambda_macro: float, lambda_micro: float) -> float:
    if not _finite_number(target):
        raise ValueError(f"target must be a finite number (a fraction of the dense cost, or a cost), got {target!r}")
    return target_fraction(target, spec, costs, quotas, lambda_macro, lambda_micro)


class Pruner:
    """Gates `model` (a timm ViT, in place) and drives HiAP over `total_steps` optimizer steps.

    The structure search takes the first `search_fraction` of the steps: the temperature anneals and the
    budget ramps over it; then the gates are rounded to the budget and frozen at their hardened state, and
    the sub-network trains on with the task loss alone (`search_fraction=1`: search to the
    end). `gate_forward`: `hard` (0/1 sample, straight-through) or `soft` (the relaxed sample).
    `settled_step` is the step after which the hardened structure last changed.

    Lambda mode (`target=None`): the penalties weigh `lambda_macro` and `lambda_micro`. Budget-exact mode:
    `target` is a fraction of the dense cost (<= 1) or an absolute cost (> 1) and one scale on both lambdas
    (their ratio kept) is adapted every step (`budget.BudgetController`). `costs`: unit costs of the
    penalties and the budget, MACs of `model` by default or a latency table (`load_cost_table`).
    The defaults are params.yaml's `hiap` group (a test keeps them equal); `init_logit` (None: `GateConfig`'s)
    sets the gates it adds to a dense model, and is refused with a model gated already (its logits are kept).
    """

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        *,
        lambda_macro: float = 0.1,
        lambda_micro: float = 0.05,
        lambda_feas: float = 10.0,
        lambda_polarise: float = 0.0,
        tau0: float = 2.0,
        tau_min: float = 0.5,
        init_logit: float | None = None,
        min_heads: float = 1.0,
        min_value_fraction: float = 0.125,
        min_neuron_fraction: float = 0.125,
        costs: UnitCosts | None = None,
        target: float | None = None,
        budget_lr: float = 0.1,
        budget_gain: float = 2.0,
        budget_deadline: float = 0.7,
        budget_velocity_steps: int = 1,
        budget_tolerance: float = 0.005,
        search_fraction: float = 0.5,
        gate_forward: str = "hard",
    ):
        _check_numbers(
            {"lambda_macro": lambda_macro, "lambda_micro": lambda_micro, "lambda_feas": lambda_feas}
            | {"lambda_polarise": lambda_polarise}
            | ({} if init_logit is None else {"init_logit": init_logit}),
            {"min_heads": min_heads, "min_value_fraction": min_value_fraction, "min_neuron_fraction": min_neuron_fraction},
            {"total_steps": total_steps, "tau0": tau0, "tau_min": tau_min},
        )
        _check_schedule(total_steps, search_fraction, gate_forward, budget_velocity_steps)
        self.total_steps = int(total_steps)
        self.search_steps = max(1, round(search_fraction * self.total_steps))  # the gates freeze after these
        temperature_at(0, self.search_steps, tau0, tau_min)  # checks the schedule before any work
        self.model = _gated(model, init_logit, tau0)
        spec = describe(self.model)
        self.quotas = Quotas.of(spec, min_heads, min_value_fraction, min_neuron_fraction)
        set_gate_forward(self.model, gate_forward)
        self._gates = gates(self.model)  # walked every step: found once
        self.tau0, self.tau_min = tau0, tau_min
        self.lambda_macro, self.lambda_micro, self.lambda_feas = lambda_macro, lambda_micro, lambda_feas
        # the polarising term acts from the deadline on: before it the gates still have a structure to find
        self.lambda_polarise, self.polarise_from = lambda_polarise, round(budget_deadline * self.search_steps)
        self.step = 0
        self.minimums = (min_heads, min_value_fraction, min_neuron_fraction)
        self.costs = costs or unit_costs(spec)
        self.dense_cost = spec_cost(spec.dense(), self.costs)  # fixed for the run: computed once
        self.dense_prunable = self.dense_cost - self.costs.static
        self.budget, self.budget_rows, self.tolerance, self.rounding = None, [], budget_tolerance, {}
        self.quota_units_restored: int | None = None  # None until the freeze
        self.at_freeze: dict = {}  # how polarised the gates were when the search ended (`polarisation`)
        if target is not None:
            fraction = _target_fraction(target, spec, self.costs, self.quotas, lambda_macro, lambda_micro)
            self.budget = BudgetController(fraction, budget_lr, budget_deadline, budget_gain)
        self.tau, self.settled_step, self._structure = tau0, 0, self._hard_structure()
        self.closed_at = torch.where(self._structure, -1, 0)  # the step each unit last closed at; -1: open
        self._past_logits = deque([self._logits()], maxlen=int(budget_velocity_steps))  # the projection's velocity
        self._frozen_penalties = None

    def _logits(self) -> list[torch.Tensor]:
        return [gate.logits.detach().clone() for gate in self._gates]

    @property
    def frozen(self) -> bool:
        return all(gate.frozen for gate in self._gates)

    def _hard_structure(self) -> torch.Tensor:
        """Every gate's hard state, on the CPU: the model may move to a GPU after the pruner is made."""
        return torch.cat([gate.hard() for gate in self._gates]).cpu()

    @property
    def penalty_scale(self) -> float:
        """The factor on both lambdas: adapted in budget-exact mode, 1 in lambda mode."""
        return self.budget.scale if self.budget is not None else 1.0

    def param_groups(self, lr: float, weight_decay: float, gate_lr: float, macro_gate_lr_scale: float = 1.0) -> list[dict]:
        return param_groups(self.model, lr, weight_decay, gate_lr, macro_gate_lr_scale)

    def set_step(self, step: int) -> float:
        """Set the gate temperature of optimizer step `step` (0-based) and, once the search is over, round
        and freeze the gates (idempotent, so a resumed run calls it the same way); returns the temperature."""
        self.step = step
        self.tau = temperature_at(step, self.search_steps, self.tau0, self.tau_min)
        set_temperature(self.model, self.tau)
        if step >= self.search_steps and not self.frozen:
            self._settle()
            freeze_gates(self.model)
            self._note_structure(self.search_steps)
        return self.tau

    def _penalties(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_macro, L_micro, L_feas, L_undecided) of the current gate probabilities."""
        macro, micro = cost_penalties(expected_cost(self.model, self.costs, self.dense_prunable))
        return macro, micro, feasibility_penalty(self.model, *self.minimums), undecided_term(self.model, self.costs)

    def loss(self, task: torch.Tensor) -> dict[str, torch.Tensor]:
        """`task + scale * (lambda_macro L_macro + lambda_micro L_micro) + lambda_feas L_feas` (+ `lambda_polarise
        L_undecided` from the deadline on) under `loss`, with each term (penalties detached) for logging; the
        task alone once the gates are frozen."""
        if self.frozen:
            if self._frozen_penalties is None:  # frozen gates: constant penalties, computed once
                with torch.no_grad():
                    self._frozen_penalties = self._penalties()
            macro, micro, feas, undecided = self._frozen_penalties
            return {"loss": task, "task": task, "macro": macro, "micro": micro, "feas": feas, "undecided": undecided}
        macro, micro, feas, undecided = self._penalties()
        loss = task + self.penalty_scale * (self.lambda_macro * macro + self.lambda_micro * micro) + self.lambda_feas * feas
        if self.lambda_polarise and self.step >= self.polarise_from:
            loss = loss + self.lambda_polarise * undecided
        terms = {"macro": macro, "micro": micro, "feas": feas, "undecided": undecided}
        return {"loss": loss, "task": task, **{k: v.detach() for k, v in terms.items()}}

    def _note_structure(self, steps_done: int) -> None:
        structure = self._hard_structure()
        if not torch.equal(structure, self._structure):
            self.closed_at[self._structure & ~structure] = steps_done
            self.closed_at[structure] = -1
            self.settled_step, self._structure = steps_done, structure

    def closing_steps(self) -> list[dict]:
        """One row per gated unit: its layer, kind (head, value_dim, ffn, neuron), index in its gate, and
        the step it last closed at (-1: open at the end), in the order of what the search gave up first."""
        offsets, start = {}, 0
        for gate in self._gates:
            offsets[id(gate)], start = start, start + gate.logits.numel()
        rows = []
        for layer, (attn, mlp) in enumerate(gated_blocks(self.model)):
            for kind, gate in (
                ("head", attn.head_gate),
                ("value_dim", attn.value_gate),
                ("ffn", mlp.block_gate),
                ("neuron", mlp.neuron_gate),
            ):
                steps = self.closed_at[offsets[id(gate)] : offsets[id(gate)] + gate.logits.numel()]
                rows.extend({"layer": layer, "kind": kind, "index": i, "closed_step": int(t)} for i, t in enumerate(steps))
        return rows

    def after_step(self, step: int) -> dict | None:
        """Note whether step `step` changed the hardened structure and, in budget-exact mode, adapt the
        penalty scale to the cost after its update; returns the trajectory row (also kept in `budget_rows`),
        None in lambda mode or once the gates are frozen."""
        if self.frozen:
            return None
        self._note_structure(step + 1)
        if self.budget is None:
            return None
        past = self._past_logits
        row = budget_step(self.budget, self.model, self.costs, self.dense_cost, step + 1, self.search_steps, past[0], len(past))
        past.append(self._logits())
        scale = row["penalty_scale"]
        row = {"step": step + 1, **row, "lambda_macro": scale * self.lambda_macro, "lambda_micro": scale * self.lambda_micro}
        self.budget_rows.append(row)
        return row

    def _settle(self) -> None:
        """At the end of the search (once): every layer gets back what its quotas ask for; in budget-exact mode
        the hardened cost is then rounded to the target (its metrics land in `rounding`)."""
        if self.quota_units_restored is not None:
            return
        self.at_freeze = polarisation(self.model, self.costs)
        if self.budget is not None:
            self.rounding = finish_budget(self.budget, self.model, self.costs, self.dense_cost, self.tolerance, self.quotas)
            self.quota_units_restored = self.rounding.pop("quota_units_restored")  # reported once, in `summary`
        else:
            self.quota_units_restored = restore_quotas(self.model, self.quotas)
        if shortfalls := quota_shortfalls(self.model, self.quotas):  # the rounding keeps them: a bug if reached
            raise RuntimeError("the settled structure breaks its quotas: " + "; ".join(shortfalls))

    def finish(self) -> PrunedViT:
        """Meet the quotas and round to the budget (unless the search already ended and did), harden and extract."""
        self.model.eval()
        self._settle()
        self._note_structure(self.total_steps)  # a search to the end rounds here: closing_steps must see it
        return extract(self.model)

    def summary(self) -> dict:
        """When the structure settled: the step after which the hardened gates last changed, as a count and
        as a fraction of training, where the search ended, how many units the quotas gave back at its end, and
        how polarised the gates were then (`polarisation`: the part the quotas and the rounding settled)."""
        return {
            "settled_step": self.settled_step,
            "settled_fraction": self.settled_step / self.total_steps,
            "search_steps": self.search_steps,
            "total_steps": self.total_steps,
            "quota_units_restored": self.quota_units_restored,
            "at_freeze": dict(self.at_freeze),
        }

    def state_dict(self) -> dict:
        """What a resumed run needs besides the model and optimizer: the controller, its trajectory, the
        rounding done at the end of the search and when the structure last changed."""
        state = {"settled_step": self.settled_step, "rounding": dict(self.rounding), "closed_at": self.closed_at.clone()}
        state["quota_units_restored"], state["at_freeze"] = self.quota_units_restored, dict(self.at_freeze)
        state["past_logits"] = list(self._past_logits)
        if self.budget is not None:
            state.update(budget=self.budget.state_dict(), budget_rows=list(self.budget_rows))
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` after the model's own weights (the structure is read off them)."""
        self.settled_step, self.rounding, self._structure = state["settled_step"], dict(state["rounding"]), self._hard_structure()
        self.closed_at = state["closed_at"].clone().cpu()
        if "quota_units_restored" not in state:
            raise ValueError(
                "this checkpoint was written before the quotas were enforced at the freeze: its "
                "structure may break them. Delete it (or its run folder) to retrain the run"
            )
        self.quota_units_restored, self.at_freeze = state["quota_units_restored"], dict(state["at_freeze"])
        if "past_logits" not in state:
            raise ValueError(
                "this checkpoint was written before the budget projection kept several steps of logits: "
                "delete it (or its run folder) to retrain the run"
            )
        self._past_logits = deque(
            ([logits.to(gate.logits.device) for logits, gate in zip(snapshot, self._gates)] for snapshot in state["past_logits"]),
            maxlen=self._past_logits.maxlen,
        )
        if self.budget is not None:
            self.budget.load_state_dict(state["budget"])
            self.budget_rows = list(state["budget_rows"])
