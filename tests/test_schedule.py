"""The schedule study (`make schedule`): every method at equal compute at each length, the study's own length
reusing its runs, and the gaps paired by seed against the steps."""

import pandas as pd
import pytest

from hiap_core.report import schedule
from hiap_core.train.params import read_params


def test_every_length_trains_hiap_then_its_baselines_at_equal_compute(monkeypatch):
    calls = []

    def fake_run(params, method, name, overrides, restart_changed=True, reports=True):
        calls.append((method, name, params["hiap"]["epochs"], params["baselines"]["epochs"], overrides))
        return {}

    monkeypatch.setattr(schedule, "study_run", fake_run)
    monkeypatch.setattr("hiap_core.train.runs.landed_macs_fraction", lambda name: 0.33)
    params = read_params()
    plan = params["schedule"]
    names = schedule.train_schedule(params)
    cells = len(plan["epochs"]) * len(plan["budgets"]) * len(params["seeds"])
    assert len(calls) == len(names) == cells * (1 + len(plan["methods"]))
    for method, name, epochs, baseline_epochs, overrides in calls:
        assert baseline_epochs == epochs  # every method trains as long as HiAP
        study_length = epochs == params["hiap"]["epochs"]
        assert name.startswith("schedule_") != study_length  # the study's own length: its own runs
        if method == "two_phase":  # the post-freeze share: search + fine-tune = HiAP's steps
            assert overrides["optim.epochs"] == epochs * (1 - params["hiap"]["search_fraction"])
            assert overrides["structure"].endswith(name.replace("two_phase", "hiap"))
        elif method != "hiap":
            assert overrides["target_macs"] == 0.33  # cut to the MACs its HiAP run landed on
    hiap_first = [m for m, *_ in calls][:: 1 + len(plan["methods"])]
    assert set(hiap_first) == {"hiap"}


def test_the_gaps_are_paired_by_seed_per_budget_and_length_and_drawn_per_budget():
    rows = []
    for epochs in (2, 4):
        for seed in range(3):
            rows += [
                ("HiAP", "harsh", seed, 80.0 + seed + epochs, 194 * epochs),
                ("Uniform", "harsh", seed, 79.0 + seed + epochs + 0.1 * seed, 194 * epochs),
            ]
    runs = pd.DataFrame(rows, columns=["method", "budget", "seed", "acc", "total_steps"]).assign(
        epochs=[e for e in (2, 4) for _ in range(6)]
    )
    gaps = schedule.schedule_gaps(runs)
    assert list(gaps["epochs"]) == [2, 4] and list(gaps["hiap_steps"]) == [388, 776]
    assert gaps["diff_mean"].iloc[0] == pytest.approx(0.9) and gaps["seeds"].tolist() == [3, 3]
    assert len(schedule.gaps_plot(gaps).axes) == 1
