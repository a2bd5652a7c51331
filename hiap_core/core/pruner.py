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

import torch
from torch import nn

from .budget import BudgetController, budget_step, finish_budget, target_fraction
from .cost import UnitCosts, expected_cost, spec_cost, unit_costs
from .describe import describe
from .extract import extract
from .gated_vit import gate_parameters, gate_vit, is_gated, set_temperature
from .losses import cost_penalties, feasibility_penalty, temperature_at
from .pruned import PrunedViT


def param_groups(model: nn.Module, lr: float, weight_decay: float, gate_lr: float | None = None) -> list[dict]:
    """Optimizer groups: weight decay on matrices only (not norms, biases, embeddings or tokens); gate
    logits in their own group at `gate_lr` without decay."""
    gates = {id(p) for p in gate_parameters(model)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) in gates or not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.split(".")[-1] in ("pos_embed", "cls_token", "reg_token")
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr}, {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    if gates:
        if gate_lr is None:
            raise ValueError("the model is gated: param_groups needs gate_lr, the learning rate of the gate logits")
        groups.append({"params": gate_parameters(model), "weight_decay": 0.0, "lr": gate_lr})
    return groups


class Pruner:
    """Gates `model` (a timm ViT, in place) and drives HiAP over `total_steps` optimizer steps.

    Lambda mode (`target=None`): the penalties weigh `lambda_macro` and `lambda_micro`. Budget-exact mode:
    `target` is a fraction of the dense cost (<= 1) or an absolute cost (> 1) and one scale on both lambdas
    (their ratio kept) is adapted every step (`budget.BudgetController`). `costs`: unit costs of the
    penalties and the budget, MACs of `model` by default or a latency table (`load_cost_table`).
    The defaults are params.yaml's `hiap` group (a test keeps them equal).
    """

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        *,
        lambda_macro: float = 0.1,
        lambda_micro: float = 0.05,
        lambda_feas: float = 10.0,
        tau0: float = 2.0,
        tau_min: float = 0.5,
        init_logit: float = 3.0,
        min_heads: float = 1.0,
        min_value_fraction: float = 0.125,
        min_neuron_fraction: float = 0.125,
        costs: UnitCosts | None = None,
        target: float | None = None,
        budget_lr: float = 0.1,
        budget_gain: float = 20.0,
        budget_ramp: float = 0.5,
        budget_tolerance: float = 0.005,
    ):
        if int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps}")
        temperature_at(0, total_steps, tau0, tau_min)  # checks the schedule before any work
        self.model = model if is_gated(model) else gate_vit(model, init_logit=init_logit, tau=tau0)
        self.total_steps, self.tau0, self.tau_min = int(total_steps), tau0, tau_min
        self.lambda_macro, self.lambda_micro, self.lambda_feas = lambda_macro, lambda_micro, lambda_feas
        self.minimums = (min_heads, min_value_fraction, min_neuron_fraction)
        spec = describe(self.model)
        self.costs = costs or unit_costs(spec)
        self.dense_cost = spec_cost(spec.dense(), self.costs)  # fixed for the run: computed once
        self.dense_prunable = self.dense_cost - self.costs.static
        self.budget, self.budget_rows, self.tolerance, self.rounding = None, [], budget_tolerance, {}
        if target is not None:
            fraction = target_fraction(target, spec, self.costs, min_heads, min_value_fraction)
            self.budget = BudgetController(fraction, budget_lr, budget_ramp, budget_gain)
        self.tau = tau0

    @property
    def penalty_scale(self) -> float:
        """The factor on both lambdas: adapted in budget-exact mode, 1 in lambda mode."""
        return self.budget.scale if self.budget is not None else 1.0

    def param_groups(self, lr: float, weight_decay: float, gate_lr: float) -> list[dict]:
        return param_groups(self.model, lr, weight_decay, gate_lr)

    def set_step(self, step: int) -> float:
        """Set the gate temperature of optimizer step `step` (0-based); returns it."""
        self.tau = temperature_at(step, self.total_steps, self.tau0, self.tau_min)
        set_temperature(self.model, self.tau)
        return self.tau

    def loss(self, task: torch.Tensor) -> dict[str, torch.Tensor]:
        """`task + scale * (lambda_macro L_macro + lambda_micro L_micro) + lambda_feas L_feas` under `loss`,
        with each term (penalties detached) for logging."""
        macro, micro = cost_penalties(expected_cost(self.model, self.costs, self.dense_prunable))
        feas = feasibility_penalty(self.model, *self.minimums)
        loss = task + self.penalty_scale * (self.lambda_macro * macro + self.lambda_micro * micro) + self.lambda_feas * feas
        return {"loss": loss, "task": task, "macro": macro.detach(), "micro": micro.detach(), "feas": feas.detach()}

    def after_step(self, step: int) -> dict | None:
        """Budget-exact mode: adapt the penalty scale to the cost after step `step`'s update; returns the
        trajectory row (also kept in `budget_rows`). Lambda mode: nothing to do, None."""
        if self.budget is None:
            return None
        row = budget_step(self.budget, self.model, self.costs, self.dense_cost, (step + 1) / self.total_steps)
        scale = row["penalty_scale"]
        row = {"step": step + 1, **row, "lambda_macro": scale * self.lambda_macro, "lambda_micro": scale * self.lambda_micro}
        self.budget_rows.append(row)
        return row

    def finish(self) -> PrunedViT:
        """Round to the budget (budget-exact mode; its metrics land in `rounding`), harden and extract."""
        self.model.eval()
        if self.budget is not None:
            self.rounding = finish_budget(self.budget, self.model, self.costs, self.dense_cost, self.tolerance, self.minimums[0])
        return extract(self.model)

    def state_dict(self) -> dict:
        """What a resumed run needs besides the model and optimizer: the controller and its trajectory."""
        return {"budget": self.budget.state_dict(), "budget_rows": list(self.budget_rows)} if self.budget is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.budget is not None:
            self.budget.load_state_dict(state["budget"])
            self.budget_rows = list(state["budget_rows"])
