"""The thread-count benchmark's 8 fine-tunes are the study's own HiAP runs, as the CLI reads them."""

import shlex
from pathlib import Path

from hiap_core.measure.fanout_threads import BUDGETS, RUNS, SEEDS, commands
from hiap_core.train.config import config_from_params
from hiap_core.train.params import read_params
from hiap_core.train.runs import run_overrides


def test_each_command_trains_the_study_run_of_its_budget_and_seed(tmp_path: Path):
    params = read_params()
    runs = commands(params, tmp_path)
    assert len(runs) == len(set(runs)) == len(BUDGETS) * len(SEEDS) == 8
    assert set(RUNS) == {(b, s) for b in BUDGETS for s in SEEDS}
    for command, (budget, seed) in zip(runs, RUNS):
        words = shlex.split(command)
        assert words[1:5] == ["-m", "hiap_core.train", "--method", "hiap"]
        out, sets = words[words.index("--out") + 1], words[words.index("--set") + 1 :]
        assert out == f"{tmp_path}/{budget}_s{seed}"
        from_cli = config_from_params(params, "hiap", [f"out={out}", *sets])
        study = config_from_params(
            params, "hiap", {"out": out, **run_overrides(params, "hiap", teacher="dense", budget=budget, seed=seed)}
        )
        assert from_cli == study


def test_the_thread_spread_compares_each_run_with_itself_at_the_other_thread_count(tmp_path: Path):
    import json

    import hiap_core
    from conftest import gated_copy, make_vit
    from hiap_core.measure.fanout_threads import outcome, thread_spread

    run = tmp_path / "run"
    hiap_core.save_pruned(hiap_core.extract(gated_copy(make_vit())), run / "model")
    (run / "metrics.json").write_text(json.dumps({"test_acc": 0.8512, "val_acc": 0.86, "macs_fraction": 0.2}))
    same = outcome(run)
    other_bits = {**same, "weights_sha256": "0" * 64, "test_acc": 0.8531, "macs_fraction": 0.20004}
    spread = thread_spread([same, same], [same, other_bits])
    assert spread == {
        "identical_weights": 1,
        "identical_architecture": 2,
        "runs": 2,
        "max_abs_test_acc_diff_pts": 0.19,
        "max_abs_val_acc_diff_pts": 0.0,
        "max_abs_macs_fraction_diff": 0.00004,
    }
