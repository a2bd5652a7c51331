"""The fine-tune recipe grid: one procedure that picks every method's peak learning rate and warmup on the
validation split (never the test set), at the mildest and the harshest tuned budget (params.yaml
`recipe_grid`). For each method and budget: every rate of `recipe_grid.lr` without warmup, then the best
of them with `recipe_grid.warmup` (a fraction of the run's steps); the pick is the best validation
accuracy of those runs. The unpruned control is tuned once; HiAP first at each budget, since the
baselines are cut to the MACs its picked run landed on and the transplant keeps that run's units.
The picks go into params.yaml `recipes` by hand (`recipe_mismatches` names any that differ), so the
default pipeline trains with them without running the grid."""

from __future__ import annotations

import pandas as pd

from .runs import run_overrides, study_methods, study_run


def grid_run_name(method: str, budget: str | None, lr: float, warmup: float) -> str:
    return f"grid_{method}{'_' + budget if budget else ''}_lr{lr:g}_w{warmup:g}"


def tune(params: dict, method: str, budget: str | None = None, match_run: str | None = None) -> list[dict]:
    """The grid's runs of `method` at `budget` (a baseline: cut to the MACs of the HiAP run `match_run`, a
    transplant: its units): one row each, the picked one marked."""
    grid, rows = params["recipe_grid"], []

    def cell(lr: float, warmup: float) -> None:
        name = grid_run_name(method, budget, lr, warmup)
        overrides = run_overrides(
            params,
            method,
            teacher="dense",
            seed=grid["seed"],
            budget=budget if method == "hiap" else None,
            match_run=match_run,
            lr_warmup={"lr": lr, "warmup": warmup},
        )
        metrics = study_run(params, method, name, overrides, restart_changed=True, reports=False)
        rows.append(
            {
                "method": method,
                "budget": budget or "-",
                "target_macs": float(params["budgets"][budget]["target_macs"]) if budget else 1.0,
                "lr": lr,
                "warmup": warmup,
                "run": name,
                "macs_fraction": metrics["macs_fraction"],
                "val_acc": 100 * metrics["val_acc"],
                "test_acc": 100 * metrics["test_acc"],  # reported, never used to pick
            }
        )

    for lr in grid["lr"]:
        cell(float(lr), 0.0)
    cell(max(rows, key=lambda r: r["val_acc"])["lr"], float(grid["warmup"]))
    best = max(rows, key=lambda r: r["val_acc"])
    for row in rows:
        row["picked"] = row is best
    return rows


def run_grid(params: dict) -> pd.DataFrame:
    """Every method's grid: the control, then per tuned budget HiAP and the baselines cut to its pick."""
    rows = tune(params, "finetune")
    for budget in params["recipe_grid"]["budgets"]:
        hiap = tune(params, "hiap", budget)
        rows += hiap
        picked = next(r["run"] for r in hiap if r["picked"])
        for method in study_methods(params, budget)[1:]:  # the baselines the study runs there
            rows += tune(params, method, budget, match_run=picked)
    return pd.DataFrame(rows)


def picks(table: pd.DataFrame) -> dict:
    """The picked recipes in the shape of params.yaml `recipes`: {method: [{macs, lr, warmup}, ...]}, the
    tuned budgets by their MACs fraction (the control: 1.0), mildest first."""
    chosen: dict = {}
    for row in table[table["picked"]].sort_values("target_macs", ascending=False).itertuples():
        chosen.setdefault(row.method, []).append(
            {"macs": float(row.target_macs), "lr": float(row.lr), "warmup": float(row.warmup)}
        )
    return chosen


def recipe_mismatches(table: pd.DataFrame, recipes: dict) -> list[str]:
    """Where params.yaml `recipes` differs from the grid's picks, one line each (empty: they agree): a method's
    own entries must be its picks, and a `borrowed` entry the named method's pick at that budget."""
    chosen, lines = picks(table), []
    for method in {*chosen, *recipes}:
        entries = recipes.get(method, [])
        own = [{k: float(v) for k, v in e.items()} for e in entries if "borrowed" not in e]
        if method in chosen and own != chosen[method]:
            lines.append(f"recipes.{method}: params.yaml has {own}, the grid picked {chosen[method]}")
        for entry in (e for e in entries if "borrowed" in e):
            source = {float(p["macs"]): p for p in chosen.get(entry["borrowed"], [])}.get(float(entry["macs"]))
            if source is None or (float(source["lr"]), float(source["warmup"])) != (float(entry["lr"]), float(entry["warmup"])):
                where = f"the entry borrowed from {entry['borrowed']} at {entry['macs']}"
                lines.append(f"recipes.{method}: {where} is not its pick {source}")
    return sorted(lines)
