"""HiAP's side of a run: the unit costs its penalties use (MACs or a measured latency table), its budget
field, and the `Pruner` made from the `hiap` settings; an impossible budget (HiAP's or a baseline cut's) is refused
before any data is read."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..core.baselines import ANALYTIC_METHODS, baseline_cut
from ..core.budget import InfeasibleBudget, target_fraction
from ..core.cost import UnitCosts, load_cost_table, unit_costs
from ..core.describe import describe
from ..core.pruner import Pruner
from ..core.quotas import Quotas
from .config import ConfigError, RunConfig
from .models import build_dense_model


def cost_model(cfg: RunConfig, spec) -> UnitCosts:
    """The unit costs the penalties use: MACs, or the measured latency table (`hiap.cost`)."""
    if cfg.hiap.cost == "macs":
        return unit_costs(spec)
    try:
        return load_cost_table(cfg.hiap.cost_table, spec)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ConfigError(f"invalid config: hiap.cost_table = {cfg.hiap.cost_table!r}: {err}") from err


def budget_field(cfg: RunConfig) -> tuple[str, float | None]:
    """The config field holding HiAP's budget, and its value (None: lambda mode)."""
    return ("hiap.target_latency", cfg.hiap.target_latency) if cfg.hiap.cost == "latency" else ("target_macs", cfg.target_macs)


def check_budget(cfg: RunConfig) -> None:
    """Refuse a budget no model can meet (HiAP's under its quotas, a baseline cut's on the architecture
    where its sizes follow from it), or an unreadable cost table, before any data or teacher is read: the check runs on the
    model built on the meta device."""
    field, target = budget_field(cfg)
    if cfg.method not in ("hiap", *ANALYTIC_METHODS) or target is None:
        return
    with torch.device("meta"):
        spec = describe(build_dense_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None))))
    h = cfg.hiap
    costs = cost_model(cfg, spec) if cfg.method == "hiap" else None  # its own one-line error, naming its field
    try:
        if cfg.method == "hiap":
            quotas = Quotas.of(spec, h.min_heads, h.min_value_fraction, h.min_neuron_fraction)
            target_fraction(target, spec, costs, quotas, h.lambda_macro, h.lambda_micro)
        else:
            baseline_cut(spec, cfg.method, target)
    except (InfeasibleBudget, ValueError) as err:
        raise ConfigError(f"invalid config: {field} = {target!r}: {err}") from err


def make_pruner(cfg: RunConfig, model: nn.Module, total_steps: int) -> Pruner:
    """The run's `Pruner` from the `hiap` settings (gates `model` in place); a budget no model can meet is
    refused here, before training, naming the field."""
    h = cfg.hiap
    costs = cost_model(cfg, describe(model))
    field, target = budget_field(cfg)
    try:
        return Pruner(
            model,
            total_steps,
            lambda_macro=h.lambda_macro,
            lambda_micro=h.lambda_micro,
            lambda_feas=h.lambda_feas,
            lambda_polarise=h.lambda_polarise,
            tau0=h.tau0,
            tau_min=h.tau_min,
            init_logit=h.init_logit,
            min_heads=h.min_heads,
            min_value_fraction=h.min_value_fraction,
            min_neuron_fraction=h.min_neuron_fraction,
            costs=costs,
            target=target,
            budget_lr=h.budget_lr,
            budget_gain=h.budget_gain,
            budget_deadline=h.budget_deadline,
            budget_velocity_steps=h.budget_velocity_steps,
            budget_tolerance=h.budget_tolerance,
            search_fraction=h.search_fraction,
            gate_forward=h.gate_forward,
        )
    except InfeasibleBudget as err:
        raise ConfigError(f"invalid config: {field} = {target!r}: {err}") from err
