"""Seed statistics for the study's tables: one row per method and budget over its seeds, and paired
differences (same seed: same fine-tuning order and gate noise) with a t confidence interval."""

from __future__ import annotations

import pandas as pd
from scipy import stats

from ..train.runs import run_metrics


def seed_runs(names: dict[tuple[str, str, int], str]) -> pd.DataFrame:
    """One row per run: `names` maps (method label, budget, seed) to the run's folder under data/runs."""
    rows = []
    for (method, budget, seed), name in names.items():
        m = run_metrics(name)
        rows.append(
            {
                "method": method,
                "budget": budget,
                "seed": seed,
                "run": name,
                "macs_M": m["macs"] / 1e6,
                "reduction_pct": m["reduction_pct"],
                "params_M": m["params"] / 1e6,
                "acc": 100 * m["test_acc"],
                "settled_fraction": m.get("structure", {}).get("settled_fraction"),
            }
        )
    return pd.DataFrame(rows)


def seed_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per method and budget: seeds, mean MACs (M), reduction, params (M), accuracy mean and standard
    deviation over seeds (percent), and the standard error of the mean."""
    grouped = runs.groupby(["method", "budget"], sort=False)
    table = grouped.agg(
        seeds=("seed", "nunique"),
        macs_M=("macs_M", "mean"),
        reduction_pct=("reduction_pct", "mean"),
        params_M=("params_M", "mean"),
        acc_mean=("acc", "mean"),
        acc_std=("acc", "std"),
    )
    table["acc_sem"] = table["acc_std"] / table["seeds"] ** 0.5
    return table.reset_index()


def paired_differences(runs: pd.DataFrame, reference: str, confidence: float = 0.95) -> pd.DataFrame:
    """`reference` minus each other method, per budget, paired by seed: mean difference in accuracy points
    and its two-sided t interval over the seeds both have; `significant` when the interval excludes 0."""
    rows = []
    for budget, at_budget in runs.groupby("budget", sort=False):
        by_seed = at_budget.pivot_table(index="seed", columns="method", values="acc")
        if reference not in by_seed:
            continue
        for other in (m for m in by_seed.columns if m != reference):
            diff = (by_seed[reference] - by_seed[other]).dropna()
            n, mean = len(diff), float(diff.mean())
            half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * diff.std() / n**0.5) if n > 1 else float("nan")
            rows.append(
                {
                    "budget": budget,
                    "versus": other,
                    "seeds": n,
                    "diff_mean": mean,
                    "ci_low": mean - half,
                    "ci_high": mean + half,
                    "significant": bool(n > 1 and (mean - half > 0 or mean + half < 0)),
                }
            )
    return pd.DataFrame(rows)


def describe_differences(paired: pd.DataFrame, reference: str) -> str:
    """The paired table in words: which differences the interval tells apart from zero, and which not."""
    lines = []
    for row in paired.itertuples():
        interval = f"{row.diff_mean:+.2f} points (95% CI {row.ci_low:+.2f} to {row.ci_high:+.2f}, {row.seeds} seeds)"
        if not row.significant:
            verdict = "cannot be told apart from"
        else:
            verdict = "is better than" if row.diff_mean > 0 else "is worse than"
        lines.append(f"- {row.budget}: {reference} {verdict} {row.versus}: {interval}.")
    return "\n".join(lines)
