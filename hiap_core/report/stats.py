"""Seed statistics for the study's tables: one row per method and budget over its seeds, the frontier's
points with t intervals, and paired differences (same seed: same fine-tuning order and gate noise), each
with one kind of interval throughout, the paired t interval (95%, unadjusted), and a paired t-test. The
comparisons declared before the run (params.yaml `comparisons.primary`) are one family whose p-values are
Holm-adjusted over itself alone; every other row is exploratory (unadjusted p). The power analysis sizes
the seeds from the measured paired SD, and the words follow the numbers (`describe_differences`)."""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats

from ..train.runs import RUNS, run_metrics


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
                "total_steps": m["total_steps"] if "total_steps" in m else history_steps(name),  # search included
                "settled_fraction": m.get("structure", {}).get("settled_fraction"),
            }
        )
    return pd.DataFrame(rows)


def history_steps(name: str) -> int:
    """The optimizer steps run `name` trained, from its history.csv: the committed teacher's metrics.json
    predates `total_steps` (it searched nothing, so its steps are all its training)."""
    path = RUNS / name / "history.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{RUNS / name / 'metrics.json'} has no total_steps and {path} is missing: rerun its stage")
    return int(pd.read_csv(path)["steps_per_epoch"].sum())


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


def paired_differences(
    runs: pd.DataFrame, reference: str, confidence: float = 0.95, versus: list[str] | None = None
) -> pd.DataFrame:
    """`reference` minus each other method (or those in `versus`), per budget, paired by seed: mean difference
    in accuracy points, its two-sided t interval over the seeds both have and the paired t-test's p. Every row
    is `exploratory` until `holm_family` makes some the primary family."""
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
                    "reference": reference,
                    "versus": other,
                    "steps": f"{steps[reference]:.0f} vs {steps[other]:.0f}",  # total training steps, search included
                    "seeds": n,
                    "diff_mean": mean,
                    "diff_sd": spread,
                    "ci_low": mean - half,
                    "ci_high": mean + half,
                    "p": p,
                }
            )
    columns = ["budget", "reference", "versus", "steps", "seeds", "diff_mean", "diff_sd", "ci_low", "ci_high", "p"]
    table = pd.DataFrame(rows, columns=columns)
    return table.assign(family="exploratory", p_holm=float("nan"), significant=False)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN stays NaN)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if p == p)
    adjusted, running = [float("nan")] * len(p_values), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def declared_family(paired: pd.DataFrame, reference: str, versus: list[str]) -> pd.Series:
    """The rows of the family declared before the run: `reference` against each method of `versus`, at every
    budget where both ran (params.yaml `comparisons.primary`, as labels)."""
    return (paired["reference"] == reference) & paired["versus"].isin(versus)


def holm_family(paired: pd.DataFrame, primary: pd.Series, alpha: float = 0.05) -> pd.DataFrame:
    """The rows where `primary` is true become the primary family: Holm over them alone (`p_holm`), and
    `significant` where that is below `alpha`; the other rows stay exploratory (no adjusted p)."""
    table = paired.copy()
    table["family"] = primary.map({True: "primary", False: "exploratory"}).to_numpy()
    is_primary = table["family"] == "primary"
    table["p_holm"] = float("nan")
    table.loc[is_primary, "p_holm"] = holm(list(table.loc[is_primary, "p"]))
    table["significant"] = is_primary & (table["p_holm"] < alpha)
    return table


def describe_differences(paired: pd.DataFrame) -> str:
    """The paired table in words, one line a row. A primary row names its Holm-adjusted p and, above alpha,
    reads "not significant after Holm"; an exploratory row names its unadjusted p and whether its interval
    excludes 0. No row is ever called indistinguishable: an interval that excludes 0 says so."""
    lines = []
    for row in paired.itertuples():
        numbers = f"{row.diff_mean:+.2f} points (95% CI {row.ci_low:+.2f} to {row.ci_high:+.2f}, {row.seeds} seeds"
        if row.family == "primary":
            if row.significant:
                verdict = "better than" if row.diff_mean > 0 else "worse than"
                text = f"{row.reference} is {verdict} {row.versus}: {numbers}, Holm-adjusted p {row.p_holm:.3g})"
            else:
                text = f"{row.reference} vs {row.versus}: {numbers}), not significant after Holm (adjusted p {row.p_holm:.3g})"
        else:
            excludes = row.ci_low > 0 or row.ci_high < 0
            where = "excludes 0" if excludes else "includes 0"
            text = f"{row.reference} vs {row.versus} (exploratory): {numbers}, unadjusted p {row.p:.3g}; the interval {where})"
        lines.append(f"- {row.budget}: {text}.")
    return "\n".join(lines)


def power(n: int, sd: float, difference: float, alpha: float) -> float:
    """The probability that a two-sided paired t-test at level `alpha` over `n` seeds finds a true mean
    difference `difference` whose per-seed differences have standard deviation `sd` (noncentral t)."""
    if n < 2 or not sd > 0:
        return float("nan")
    df, shift = n - 1, difference / (sd / math.sqrt(n))
    critical = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift))


def seeds_needed(sd: float, difference: float, alpha: float, target: float = 0.8, at_least: int = 3, at_most: int = 1000) -> int:
    """The fewest seeds (>= `at_least`) at which `power` reaches `target`; `at_most` + 1 when none up to it does."""
    for n in range(max(2, at_least), at_most + 1):
        if power(n, sd, difference, alpha) >= target:
            return n
    return at_most + 1


def detectable_difference(n: int, sd: float, alpha: float, target: float = 0.8) -> float:
    """The smallest true difference `power` finds with probability `target` over `n` seeds (bisection)."""
    if n < 2 or not sd > 0:
        return float("nan")
    low, high = 0.0, sd
    while power(n, sd, high, alpha) < target:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if power(n, sd, middle, alpha) < target else (low, middle)
    return high


def power_table(primary: pd.DataFrame, difference: float, target: float = 0.8, alpha: float = 0.05) -> pd.DataFrame:
    """Per budget, from the primary family's paired rows (`diff_sd`, `seeds`): its comparisons, the paired SD
    pooled over them (root mean square) and the largest, the seeds it has, the seeds at which a true
    `difference` is found with probability `target` after Holm over the whole family, and the smallest
    difference its seeds find so. After Holm the first rejection needs p < alpha / (family size), the
    strictest level a comparison can face: the seeds are sized for it (a bound: later steps are easier)."""
    level = alpha / len(primary)
    rows = []
    for budget, at in primary.groupby("budget", sort=False):
        sd = math.sqrt(float((at["diff_sd"] ** 2).mean()))
        seeds = int(at["seeds"].min())
        rows.append(
            {
                "budget": budget,
                "comparisons": len(at),
                "paired_sd": sd,
                "paired_sd_max": float(at["diff_sd"].max()),
                "seeds": seeds,
                "level_per_test": level,
                "seeds_needed": seeds_needed(sd, difference, level, target),
                "detectable_diff": detectable_difference(seeds, sd, level, target),
            }
        )
    return pd.DataFrame(rows)
