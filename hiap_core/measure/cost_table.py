"""Latency-aware cost (beyond the paper, whose stated limitation is optimising MACs, not latency).

A per-unit latency table for one architecture on this machine: extracted models of random widths are
timed (round-robin, so drift hits all alike) and the linear decomposition

    latency = static + head * heads + value_dim * value dims + neuron * FFN neurons

is fitted by least squares. It has the structure of the MACs cost, so `hiap.cost: latency` feeds it
through the same penalty code (`hiap_core.load_cost_table`). Models of other random widths, timed in the
same loop but not used in the fit, measure how well the table predicts real latency. A fit in which no unit
costs anything (a small model on a busy machine: noise larger than the widths' effect) is timed again with
twice the runs, up to `RETIMINGS` times, and then refused: such a table is no cost to steer by.

    python -m hiap_core.measure.cost_table --params params.yaml --out reports/tables/cost_table.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.cost import UnitCosts, count_macs, spec_cost
from ..core.describe import describe
from ..core.extract import extract
from ..core.files import atomic_write
from ..core.gated_vit import gate_vit, set_gate_state
from ..core.spec import ViTSpec
from ..core.timing import models_ms
from ..train.config import cli, config_from_params, load_params
from ..train.models import build_dense_model
from ..train.paths import PARAMS, REPORTS
from .states import random_budget_state, random_width_state
from ..core.timing import machine

COEFFICIENTS = ("static", "head", "value_dim", "neuron")
UNIT_COEFFICIENTS = COEFFICIENTS[1:]
RETIMINGS = 3  # at most 1 + 2 + 4 + 8 = 15 times the runs asked for


def unit_counts(spec: ViTSpec) -> dict:
    """The regressors of the fit: live heads, value dims and neurons over all layers."""
    return {
        "heads": sum(len(layer.heads) for layer in spec.layers),
        "value_dims": sum(sum(layer.value_dims) for layer in spec.layers),
        "neurons": sum(layer.mlp_hidden or 0 for layer in spec.layers),
    }


def fit_linear(samples: pd.DataFrame) -> dict:
    """Least squares `ms ~ static + head*heads + value_dim*value_dims + neuron*neurons`; a unit cost that comes
    out negative (noise) is fixed at 0 and the rest refitted, so the table stays a cost."""
    columns = {
        "static": np.ones(len(samples)),
        "head": samples["heads"],
        "value_dim": samples["value_dims"],
        "neuron": samples["neurons"],
    }
    free = list(COEFFICIENTS)
    while True:
        design = np.stack([np.asarray(columns[c], dtype=float) for c in free], axis=1)
        solution, *_ = np.linalg.lstsq(design, samples["ms"].to_numpy(float), rcond=None)
        coefficients = dict(zip(free, solution.tolist()))
        negative = [c for c in free if coefficients[c] < 0]
        if not negative:
            return {c: coefficients.get(c, 0.0) for c in COEFFICIENTS}
        free.remove(min(negative, key=coefficients.get))


def predict_ms(coefficients: dict, spec: ViTSpec) -> float:
    return spec_cost(spec, UnitCosts.from_coefficients(coefficients, "ms"))


def prediction_quality(measured, predicted) -> dict:
    measured, predicted = np.asarray(measured, float), np.asarray(predicted, float)
    residual = ((measured - predicted) ** 2).sum()
    total = ((measured - measured.mean()) ** 2).sum()
    relative = np.abs(predicted - measured) / measured
    return {
        "r2": float(1 - residual / total),
        "max_relative_error": float(relative.max()),
        "mean_relative_error": float(relative.mean()),
    }


def time_and_fit(models: dict, samples: pd.DataFrame, x: torch.Tensor, runs: int, progress: bool) -> tuple[dict, int]:
    """Time every model (`samples["ms"]`, in place) and fit the table on the `fit` rows, timing again with twice
    the runs while no unit cost comes out above 0; returns (coefficients, runs per model)."""
    for retiming in range(RETIMINGS + 1):
        ms = models_ms(models, x, runs, warmup=2, progress=progress)
        samples["ms"] = [ms[name] for name in samples["model"]]
        coefficients = fit_linear(samples[samples.role == "fit"])
        if any(coefficients[c] > 0 for c in UNIT_COEFFICIENTS):
            return coefficients, runs
        if retiming < RETIMINGS:
            runs *= 2
    raise ValueError(
        f"the latency of {int((samples.role == 'fit').sum())} models of random widths at batch {len(x)} does not grow with "
        f"any unit (heads, value dims, neurons) above this machine's timing noise, with up to {runs} runs per model: "
        "measure on a quieter machine, or raise cost_table.batch_size or cost_table.runs"
    )


def measure_cost_table(
    dense: nn.Module,
    batch_size: int = 64,
    fit_models: int = 40,
    eval_models: int = 20,
    runs: int = 15,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict, pd.DataFrame]:
    """Time `fit_models` random-width and `eval_models` random-budget extracted models of `dense` (a timm ViT)
    round-robin at `batch_size`; fit the table on the first, evaluate it on the second.

    Returns (table, samples): the JSON-able table (coefficients in ms per batch, fit and evaluation quality,
    the machine) and one row per timed model."""
    if fit_models < len(COEFFICIENTS) or eval_models < 2 or runs < 1:
        raise ValueError(
            f"need fit_models >= {len(COEFFICIENTS)}, eval_models >= 2 and runs >= 1 (got {fit_models}, {eval_models}, {runs})"
        )
    gen = torch.Generator().manual_seed(seed)
    gated = gate_vit(copy.deepcopy(dense)).eval()
    models, rows = {}, []
    for i in range(fit_models + eval_models):
        if i < fit_models:
            state, role = random_width_state(gated, gen), "fit"
        else:  # the evaluation set: what HiAP produces, random states at random MACs budgets
            state, role = random_budget_state(gated, gen), "eval"
        set_gate_state(gated, state)
        models[f"m{i}"] = extract(gated).eval()
        spec = models[f"m{i}"].spec
        rows.append({"model": f"m{i}", "role": role, **unit_counts(spec), "macs": count_macs(spec)})
    spec = describe(dense)
    x = torch.randn(batch_size, spec.in_chans, *spec.img_size)
    samples = pd.DataFrame(rows)
    coefficients, timed_runs = time_and_fit(models, samples, x, runs, progress)
    samples["predicted_ms"] = [predict_ms(coefficients, models[name].spec) for name in samples["model"]]
    fit, held_out = samples[samples.role == "fit"], samples[samples.role == "eval"]
    dense_ms = predict_ms(coefficients, spec.dense())
    table = {
        "unit": "ms",
        "batch_size": batch_size,
        "device": machine(),
        "spec": spec.dense().to_dict(),
        "coefficients": coefficients,
        "dense_predicted_ms": dense_ms,
        "static_fraction": coefficients["static"] / dense_ms,
        "fit": {"models": len(fit), **prediction_quality(fit["ms"], fit["predicted_ms"])},
        "evaluation": {"models": len(held_out), **prediction_quality(held_out["ms"], held_out["predicted_ms"])},
        "runs_per_model": timed_runs,
        "seed": seed,
    }
    return table, samples


def write_cost_table(table: dict, path) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(table, indent=2)))


def cost_table_from_params(params: dict, progress: bool = True) -> tuple[dict, pd.DataFrame]:
    """`measure_cost_table` for the `model` of params.yaml with the `cost_table` group's settings."""
    settings = params["cost_table"]
    torch.set_num_threads(settings["threads"])
    torch.manual_seed(settings["seed"])
    dense = build_dense_model(config_from_params(params, "dense")).eval()
    return measure_cost_table(
        dense,
        settings["batch_size"],
        settings["fit_models"],
        settings["eval_models"],
        settings["runs"],
        settings["seed"],
        progress,
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Measure the per-unit latency table of the params.yaml model on this machine.")
    parser.add_argument("--params", default=str(PARAMS))
    parser.add_argument("--out", default=str(REPORTS / "tables" / "cost_table.json"))
    parser.add_argument("--samples", help="also write every timed model, measured and predicted, to this CSV")
    args = parser.parse_args(argv)
    table, samples = cost_table_from_params(load_params(args.params))
    write_cost_table(table, args.out)
    if args.samples:
        atomic_write(args.samples, lambda p: samples.to_csv(p, index=False))
    print(json.dumps({k: table[k] for k in ("coefficients", "fit", "evaluation")}, indent=2))
    return table


if __name__ == "__main__":
    sys.exit(cli(main))
