"""The gate-evolution explorer: step-resolution runs load, draw, and one change of a control draws once; on a
fresh clone (no run folders) it reads the committed copies."""

import json
import shutil

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from conftest import make_vit

import hiap_core
from hiap_core.report import explorer
from hiap_core.train.runs import REPORT_FILES

pytest.importorskip("ipywidgets")


def fake_run(folder, steps_per_epoch: int, epochs: int, gated: bool) -> None:
    model = hiap_core.extract(hiap_core.gate_vit(make_vit(depth=2).eval()))
    hiap_core.save_pruned(model, folder / "model")
    spec, macs = model.spec, hiap_core.count_macs(model)
    history = pd.DataFrame(
        {"epoch": range(1, epochs + 1), "val_acc": 0.5, "lr": 1e-4, "steps_per_epoch": steps_per_epoch, "train_loss": 1.0}
    )
    metrics = {
        "method": "hiap" if gated else "uniform",
        "test_acc": 0.5,
        "macs": macs,
        "dense_macs": macs,
        "macs_fraction": 1.0,
        "reduction_pct": 0.0,
        "params": 1,
        "epochs": epochs,
        "target_macs": 0.5,
    }
    if gated:
        history = history.assign(tau=1.0, expected_macs=macs, hard_macs=macs)
        snapshots = [0, 5, 10, 11]
        gates = [
            {
                "step": s,
                "epoch": s / steps_per_epoch,
                "layer": layer,
                "heads": spec.num_heads,
                "value_dims_total": 8,
                "neurons": 10,
            }
            for s in snapshots
            for layer in range(2)
        ]
        pd.DataFrame(gates).to_csv(folder / "gates.csv", index=False)
        budget = pd.DataFrame({"step": range(1, 11), "cost_fraction": 0.6, "expected_fraction": 0.6, "penalty_scale": 2.0})
        budget.to_csv(folder / "budget.csv", index=False)
        metrics["structure"] = {"search_steps": 10, "settled_step": 9, "settled_fraction": 0.4, "total_steps": 24}
    history.to_csv(folder / "history.csv", index=False)
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture(params=["run folders", "committed copies"])
def runs(request, tmp_path, monkeypatch):
    """The two runs in their folders (trained here), or as a fresh clone has them: copied to reports/metrics as
    `study_run` copies them, the folders gone."""
    folders, committed = tmp_path / "runs", tmp_path / "metrics"
    fake_run(folders / "hiap_x", steps_per_epoch=12, epochs=2, gated=True)
    fake_run(folders / "uniform_x", steps_per_epoch=12, epochs=1, gated=False)
    if request.param == "committed copies":
        for name in ("hiap_x", "uniform_x"):
            for source, target in REPORT_FILES:
                if (folders / name / source).is_file():
                    (committed / target.format(name)).parent.mkdir(exist_ok=True)
                    shutil.copyfile(folders / name / source, committed / target.format(name))
        shutil.rmtree(folders)
        folders.mkdir()
    monkeypatch.setattr(explorer, "RUNS", folders)
    monkeypatch.setattr(explorer, "COMMITTED", committed)
    return tmp_path


def test_every_run_is_listed_and_an_unknown_one_is_named(runs):
    assert explorer.run_names() == ["hiap_x", "uniform_x"]
    with pytest.raises(FileNotFoundError, match="hiap_y is neither a finished run .* nor committed .*; runs: hiap_x, uniform_x"):
        explorer.load_run("hiap_y")


def test_runs_load_at_step_resolution(runs):
    hiap, uniform = explorer.load_run("hiap_x"), explorer.load_run("uniform_x")
    assert hiap.steps == [0, 5, 10, 11] and hiap.total_steps == 24
    assert uniform.steps == [0, 12] and uniform.total_steps == 12  # a baseline: its final structure throughout
    assert explorer.step_structure(hiap, 7).equals(explorer.step_structure(hiap, 5))  # the last snapshot before it
    assert hiap.budget is not None and uniform.budget is None and hiap.spec == uniform.spec
    explorer.evolution_plot(hiap, 7)
    explorer.comparison_plot([hiap, uniform], 7)
    plt.close("all")


def test_one_change_of_a_control_draws_the_output_once(runs):
    box = explorer.explore("hiap_x", "uniform_x")
    pick, other, step = box.children[0].children
    assert box.draws == 1 and step.max == 24
    assert len(box.children[1].outputs) == 4  # step table, comparison table, evolution and comparison figures
    pick.value = "uniform_x"  # fewer steps while the slider sits past their end: clamped quietly, drawn once
    assert box.draws == 2 and step.max == 12 and step.value == 12
    step.value = 5
    assert box.draws == 3
    other.value = "(none)"
    assert box.draws == 4
    assert [output["output_type"] for output in box.children[1].outputs] == ["display_data"] * 2  # no comparison


def test_the_explorer_sets_its_output_and_never_captures_into_it(runs, monkeypatch):
    """Output captured with `with output:` makes nbclient (papermill) answer on the shell socket while it awaits
    the cell's reply there: that race hung the gate_evolution stage about 1 run in 10."""
    import ipywidgets

    monkeypatch.setattr(ipywidgets.Output, "__enter__", lambda self: pytest.fail("captured into the Output widget"))
    box = explorer.explore("hiap_x", "uniform_x")
    box.children[0].children[2].value = 5
    assert box.draws == 2 and len(box.children[1].outputs) == 4


def test_a_fresh_clone_opens_every_committed_study_run(tmp_path, monkeypatch):
    """The committed study, as a fresh clone has it (no run folder but the teacher's): every run the study
    commits is listed and loads, and its architecture costs the MACs its metrics state."""
    folders = tmp_path / "runs"
    folders.mkdir()
    shutil.copytree(explorer.RUNS / "dense", folders / "dense")
    monkeypatch.setattr(explorer, "RUNS", folders)
    committed = {p.name.removesuffix("_architecture.json") for p in explorer.COMMITTED.glob("*_architecture.json")}
    assert len(committed) > 100  # every training stage of dvc.yaml writes one
    assert set(explorer.run_names()) == committed | {"dense"}
    for name in sorted(committed):
        run = explorer.load_run(name)
        assert hiap_core.count_macs(run.spec) == run.metrics["macs"], name
        assert run.total_steps > 0 and len(run.gates) > 0, name
