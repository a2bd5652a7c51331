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
    assert row["p"] == pytest.approx(p) and row["p_holm"] == pytest.approx(p)  # one comparison: nothing to adjust
    assert row["significant"] == (p < 0.05)
    assert "HiAP" in stats.describe_differences(stats.paired_differences(runs, "HiAP"), "HiAP")


def test_a_difference_inside_the_noise_is_not_called_significant():
    runs = runs_frame(
        [("HiAP", "b", s, 1, 1, 1, a) for s, a in enumerate([80.0, 81.0, 79.0])]
        + [("L1", "b", s, 1, 1, 1, a) for s, a in enumerate([79.5, 81.5, 79.2])]
    )
    paired = stats.paired_differences(runs, "HiAP")
    assert not paired["significant"].iloc[0] and paired["ci_low"].iloc[0] < 0 < paired["ci_high"].iloc[0]
    assert "cannot be told apart" in stats.describe_differences(paired, "HiAP")


def test_holm_adjusts_the_family_step_down():
    assert stats.holm([0.01, 0.04, 0.03, float("nan")])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.001])[::-1] == pytest.approx([0.002, 0.5])


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
