"""Seed statistics of the study tables: aggregation and paired t intervals."""

import pandas as pd
import pytest
from scipy import stats as scipy_stats

from hiap_core.report import stats


def runs_frame(rows, steps=None):
    """Runs of these columns; `steps`: total training steps per method (194 where not named)."""
    runs = pd.DataFrame(rows, columns=["method", "budget", "seed", "macs_M", "reduction_pct", "params_M", "acc"])
    return runs.assign(total_steps=runs["method"].map(lambda m: (steps or {}).get(m, 194)))


def test_seed_table_has_one_row_per_method_and_budget_with_mean_and_std():
    runs = runs_frame(
        [("HiAP", "b", s, 10.0 + s, 50.0, 1.0, a) for s, a in enumerate([80.0, 82.0, 84.0])]
        + [("Uniform", "b", s, 10.0, 50.0, 1.0, 79.0) for s in range(3)],
        steps={"Uniform": 291},
    )
    table = stats.seed_table(runs).set_index("method")
    assert (table.loc["HiAP", "total_steps"], table.loc["Uniform", "total_steps"]) == (194, 291)
    assert table.loc["HiAP", "seeds"] == 3 and table.loc["HiAP", "acc_mean"] == pytest.approx(82.0)
    assert table.loc["HiAP", "acc_std"] == pytest.approx(2.0) and table.loc["HiAP", "macs_M"] == pytest.approx(11.0)
    assert table.loc["HiAP", "acc_sem"] == pytest.approx(2.0 / 3**0.5) and table.loc["Uniform", "acc_std"] == 0


def test_paired_interval_is_the_t_interval_of_the_per_seed_differences():
    hiap, other = [80.0, 82.5, 81.0, 83.0], [79.0, 82.0, 79.5, 82.9]
    runs = runs_frame(
        [("HiAP", "b", s, 1, 1, 1, a) for s, a in enumerate(hiap)] + [("L1", "b", s, 1, 1, 1, a) for s, a in enumerate(other)],
        steps={"L1": 291},
    )
    row = stats.paired_differences(runs, "HiAP").iloc[0]
    assert row["steps"] == "194 vs 291"  # each side's total training steps, search included
    diffs = pd.Series(hiap) - pd.Series(other)
    half = scipy_stats.t.ppf(0.975, 3) * diffs.std() / 2
    assert row["versus"] == "L1" and row["seeds"] == 4
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    p = 2 * scipy_stats.t.sf(abs(diffs.mean()) / (diffs.std() / 2), 3)
    assert row["p"] == pytest.approx(p) and row["diff_sd"] == pytest.approx(diffs.std())
    assert row["family"] == "exploratory" and not row["significant"]  # until a declared family holds it


def test_holm_adjusts_the_family_step_down():
    assert stats.holm([0.01, 0.04, 0.03, float("nan")])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.001])[::-1] == pytest.approx([0.002, 0.5])


def three_way(seed_diffs: dict[str, list[float]]) -> pd.DataFrame:
    """HiAP at 80 + a seed's offset, and each method `diff` below it per seed."""
    rows = [("HiAP", "b", s, 1, 1, 1, 80.0 + s) for s in range(4)]
    for method, diffs in seed_diffs.items():
        rows += [(method, "b", s, 1, 1, 1, 80.0 + s - d) for s, d in enumerate(diffs)]
    return runs_frame(rows)


def test_holm_runs_over_the_declared_family_only_and_the_rest_stays_unadjusted():
    runs = three_way({"A": [1.0, 1.2, 0.9, 1.1], "B": [0.5, 0.7, 0.4, 0.6], "C": [0.2, -0.1, 0.3, 0.1]})
    paired = stats.paired_differences(runs, "HiAP")
    table = stats.holm_family(paired, paired["versus"].isin(["A", "B"]))
    primary = table[table["family"] == "primary"]
    assert list(primary["versus"]) == ["A", "B"]
    assert list(primary["p_holm"]) == pytest.approx(stats.holm(list(primary["p"])))  # a family of two, not three
    explored = table[table["family"] == "exploratory"].iloc[0]
    assert explored["versus"] == "C" and explored["p_holm"] != explored["p_holm"] and not explored["significant"]


def test_the_words_follow_the_numbers():
    runs = three_way(
        {"A": [1.0, 1.2, 0.9, 1.1], "B": [0.3, -0.2, 0.6, 0.1], "C": [0.5, 0.7, 0.4, 0.6], "D": [0.3, -0.4, 0.5, -0.2]}
    )
    paired = stats.paired_differences(runs, "HiAP")
    table = stats.holm_family(paired, paired["versus"].isin(["A", "B"]))
    words = dict(zip(table["versus"], stats.describe_differences(table).splitlines()))
    assert "HiAP is better than A: +1.05 points (95% CI" in words["A"] and "Holm-adjusted p" in words["A"]
    b = table.set_index("versus").loc["B"]
    assert b["p_holm"] > 0.05 and f"{b['diff_mean']:+.2f} points (95% CI {b['ci_low']:+.2f} to {b['ci_high']:+.2f}" in words["B"]
    assert "not significant after Holm" in words["B"]
    assert "(exploratory)" in words["C"] and "unadjusted p" in words["C"] and "the interval excludes 0" in words["C"]
    assert "the interval includes 0" in words["D"]
    assert not any("cannot be told apart" in line for line in words.values())


def test_power_matches_a_simulated_paired_t_test_and_sizes_the_seeds():
    import numpy as np

    rng = np.random.default_rng(0)
    n, sd, diff, alpha = 5, 0.3, 0.5, 0.01
    samples = rng.normal(diff, sd, size=(20000, n))
    t = samples.mean(1) / (samples.std(1, ddof=1) / n**0.5)
    simulated = (np.abs(t) > scipy_stats.t.ppf(1 - alpha / 2, n - 1)).mean()
    assert stats.power(n, sd, diff, alpha) == pytest.approx(simulated, abs=0.01)
    needed = stats.seeds_needed(sd, diff, alpha, 0.8)
    assert stats.power(needed, sd, diff, alpha) >= 0.8 > stats.power(needed - 1, sd, diff, alpha)
    assert stats.seeds_needed(0.01, 5.0, 0.05, 0.8) == 3  # never fewer than 3
    found = stats.detectable_difference(n, sd, alpha, 0.8)
    assert stats.power(n, sd, found, alpha) == pytest.approx(0.8, abs=1e-6)


def test_the_power_table_sizes_each_budget_for_holm_over_the_whole_family():
    primary = pd.DataFrame({"budget": ["x", "x", "y"], "diff_sd": [0.2, 0.4, 0.5], "seeds": [3, 3, 3], "versus": ["A", "B", "A"]})
    table = stats.power_table(primary, 0.75, 0.8, 0.05).set_index("budget")
    assert table.loc["x", "paired_sd"] == pytest.approx((0.1) ** 0.5) and table.loc["x", "paired_sd_max"] == 0.4
    assert (table["level_per_test"] == 0.05 / 3).all()
    level = 0.05 / 3
    assert table.loc["y", "seeds_needed"] == stats.seeds_needed(0.5, 0.75, level, 0.8)
    assert table.loc["y", "detectable_diff"] == pytest.approx(stats.detectable_difference(3, 0.5, level, 0.8))


def test_frontier_points_carry_the_t_interval_over_seeds():
    runs = pd.DataFrame(
        {
            "method": ["HiAP"] * 3,
            "budget": ["b"] * 3,
            "seed": [0, 1, 2],
            "acc": [80.0, 82.0, 84.0],
            "macs_fraction": [0.2, 0.2, 0.2],
            "total_steps": [194] * 3,
        }
    )
    point = stats.frontier(runs).iloc[0]
    assert point["total_steps"] == 194
    assert point["acc_mean"] == pytest.approx(82.0) and point["seeds"] == 3
    assert point["ci_half"] == pytest.approx(scipy_stats.t.ppf(0.975, 2) * 2.0 / 3**0.5)


def test_the_primary_family_is_what_params_declare():
    """HiAP against each method params.yaml `comparisons.primary` names, at every budget it ran; nothing else
    (not the transplant's rows, not a method the params leave out)."""
    from hiap_core.report.tables import METHOD_LABELS
    from hiap_core.train.params import read_params

    declared = read_params()["comparisons"]["primary"]
    labels = {m: METHOD_LABELS[m] for m in ("hiap", "transplant", "finetune", *declared)}
    rows = [(labels["hiap"], "b", s, 1, 1, 1, 80.0 + s) for s in range(3)]
    for method in ("transplant", "finetune", *declared):
        rows += [(labels[method], "b", s, 1, 1, 1, 79.0 + s + 0.1 * (s % 2)) for s in range(3)]
    runs = runs_frame(rows)
    paired = pd.concat(
        [stats.paired_differences(runs, labels["hiap"]), stats.paired_differences(runs, labels["transplant"])],
        ignore_index=True,
    )
    table = stats.holm_family(paired, stats.declared_family(paired, labels["hiap"], [labels[m] for m in declared]))
    primary = table[table["family"] == "primary"]
    assert sorted(primary["versus"]) == sorted(labels[m] for m in declared)
    assert (primary["reference"] == labels["hiap"]).all() and len(primary) == len(declared)
    assert list(primary["p_holm"]) == pytest.approx(stats.holm(list(primary["p"])))


def test_the_committed_teacher_states_its_steps_from_its_history():
    """Its metrics.json predates `total_steps`: the report stage failed on it (KeyError) until the history counted."""
    runs = stats.seed_runs({("Dense", "-", 0): "dense"})
    assert runs.loc[0, "total_steps"] == 12 * 429  # 12 epochs of 429 steps (data/runs/dense/history.csv)
