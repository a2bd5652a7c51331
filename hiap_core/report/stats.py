"""Seed statistics for the study's tables: one row per method and budget over its seeds, the frontier's
points with t intervals, and paired differences (same seed: same fine-tuning order and gate noise) with a
t confidence interval and a paired t-test whose p-values are Holm-adjusted over the table's comparisons
(many rows: the words about significance use the adjusted p, the intervals stay unadjusted 95%)."""

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
                "macs_fraction": m["macs_fraction"],
                "reduction_pct": m["reduction_pct"],
                "params_M": m["params"] / 1e6,
                "acc": 100 * m["test_acc"],
                "total_steps": m["total_steps"],  # search included
                "settled_fraction": m.get("structure", {}).get("settled_fraction"),
            }
        )
    return pd.DataFrame(rows)


def seed_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per method and budget: seeds, total training steps (the search that found the structure included), mean
    MACs (M), reduction, params (M), accuracy mean and standard deviation over seeds (percent), and the standard
    error of the mean."""
    grouped = runs.groupby(["method", "budget"], sort=False)
    table = grouped.agg(
        seeds=("seed", "nunique"),
        total_steps=("total_steps", "mean"),
        macs_M=("macs_M", "mean"),
        reduction_pct=("reduction_pct", "mean"),
        params_M=("params_M", "mean"),
        acc_mean=("acc", "mean"),
        acc_std=("acc", "std"),
    )
    table["acc_sem"] = table["acc_std"] / table["seeds"] ** 0.5
    return table.reset_index()


def frontier(runs: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per method and budget: mean MACs fraction and accuracy over seeds, and the half-width of the t interval
    of the accuracy (the points and error bars of the accuracy-vs-MACs figure)."""
    rows = []
    for (method, budget), group in runs.groupby(["method", "budget"], sort=False):
        n = len(group)
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * group["acc"].std() / n**0.5) if n > 1 else float("nan")
        rows.append(
            {
                "method": method,
                "budget": budget,
                "seeds": n,
                "total_steps": group["total_steps"].mean(),
                "macs_fraction": group["macs_fraction"].mean(),
                "acc_mean": group["acc"].mean(),
                "ci_half": half,
            }
        )
    return pd.DataFrame(rows)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN stays NaN)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if p == p)
    adjusted, running = [float("nan")] * len(p_values), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def paired_differences(
    runs: pd.DataFrame, reference: str, confidence: float = 0.95, versus: list[str] | None = None, alpha: float = 0.05
) -> pd.DataFrame:
    """`reference` minus each other method (or those in `versus`), per budget, paired by seed: mean difference
    in accuracy points, its two-sided t interval over the seeds both have, the paired t-test's p and its Holm
    adjustment over every row; `significant` when the adjusted p is below `alpha`."""
    rows = []
    for budget, at_budget in runs.groupby("budget", sort=False):
        by_seed = at_budget.pivot_table(index="seed", columns="method", values="acc")
        steps = at_budget.groupby("method")["total_steps"].mean()
        if reference not in by_seed:
            continue
        for other in (m for m in by_seed.columns if m != reference and (versus is None or m in versus)):
            diff = (by_seed[reference] - by_seed[other]).dropna()
            n, mean = len(diff), float(diff.mean())
            spread = float(diff.std()) if n > 1 else float("nan")
            half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * spread / n**0.5) if n > 1 else float("nan")
            if n > 1 and spread > 0:
                p = float(2 * stats.t.sf(abs(mean) / (spread / n**0.5), n - 1))
            else:
                p = float("nan") if n < 2 else float(mean == 0)
            rows.append(
                {
                    "budget": budget,
                    "versus": other,
                    "steps": f"{steps[reference]:.0f} vs {steps[other]:.0f}",  # total training steps, search included
                    "seeds": n,
                    "diff_mean": mean,
                    "ci_low": mean - half,
                    "ci_high": mean + half,
                    "p": p,
                }
            )
    table = pd.DataFrame(rows, columns=["budget", "versus", "steps", "seeds", "diff_mean", "ci_low", "ci_high", "p"])
    table["p_holm"] = holm(list(table["p"]))
    table["significant"] = table["p_holm"] < alpha
    return table


def describe_differences(paired: pd.DataFrame, reference: str) -> str:
    """The paired table in words: which differences survive Holm's correction over the table, and which not."""
    lines = []
    for row in paired.itertuples():
        interval = (
            f"{row.diff_mean:+.2f} points (95% CI {row.ci_low:+.2f} to {row.ci_high:+.2f}, {row.seeds} seeds, "
            f"Holm-adjusted p {row.p_holm:.3g})"
        )
        if not row.significant:
            verdict = "cannot be told apart from"
        else:
            verdict = "is better than" if row.diff_mean > 0 else "is worse than"
        lines.append(f"- {row.budget}: {reference} {verdict} {row.versus}: {interval}.")
    return "\n".join(lines)
