"""The study's fair-comparison pieces: the structure transplant, the recipe picks, the teacher's weights."""

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import gate_states, gated_copy, make_vit
from hypothesis import given, settings

import hiap_core
from hiap_core.core.baselines import transplant
from hiap_core.train import data, engine, models, recipe_grid, run_folder
from hiap_core.train.config import ConfigError, config_from_params
from hiap_core.train.params import read_params
from hiap_core.train.runs import recipe

ROOT = Path(__file__).resolve().parents[1]


def closing_rows(gated) -> list[dict]:
    """`Pruner.closing_steps` rows of a hardened gated model: open units -1, closed ones at step 3."""
    rows = []
    for layer, state in enumerate(hiap_core.hard_gate_state(gated)):
        for kind, key in (("head", "heads"), ("value_dim", "values"), ("ffn", "ffn"), ("neuron", "neurons")):
            flat = state[key].reshape(-1)
            rows += [{"layer": layer, "kind": kind, "index": i, "closed_step": -1 if bool(v) else 3} for i, v in enumerate(flat)]
    return rows


@settings(max_examples=25, deadline=None)
@given(state=gate_states(depth=2, heads=3, head_dim=8, hidden=48))
def test_transplant_keeps_exactly_the_units_of_the_hiap_run(state):
    dense = make_vit(depth=2, num_heads=3, embed_dim=24).eval()
    gated = gated_copy(dense)
    hiap_core.set_gate_state(gated, state)
    moved = transplant(dense, closing_rows(gated))
    assert moved.spec == hiap_core.describe(hiap_core.extract(gated))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # the same units of the same weights: the hardened model's outputs
        torch.testing.assert_close(moved(x), gated.eval()(x), atol=1e-5, rtol=1e-5)


def test_a_transplant_of_a_run_that_is_not_hiap_is_refused_in_one_line(tmp_path):
    (tmp_path / "uniform_run").mkdir()
    params = {"baselines": {"epochs": 1}}
    cfg = config_from_params(params, "transplant", {"teacher": "t", "structure": str(tmp_path / "uniform_run")})
    with pytest.raises(ConfigError, match="structure = .*closing.csv not found; transplant needs a finished HiAP run"):
        models.structure_file(cfg)
    with pytest.raises(ConfigError, match="structure"):
        config_from_params(params, "uniform", {"teacher": "t", "target_macs": 0.5, "structure": "x"})


def test_a_run_takes_the_recipe_tuned_at_the_budget_nearest_its_own():
    params = {
        "recipes": {
            "hiap": [{"macs": 0.67, "lr": 1e-4, "warmup": 0.0}, {"macs": 0.2, "lr": 1e-3, "warmup": 0.1}],
            "finetune": [{"macs": 1.0, "lr": 3e-5, "warmup": 0.0}],
        }
    }
    assert recipe(params, "hiap", 0.5) == {"lr": 1e-4, "warmup": 0.0}  # log distance 0.29 vs 0.92
    assert recipe(params, "hiap", 0.33) == {"lr": 1e-3, "warmup": 0.1}
    assert recipe(params, "finetune") == {"lr": 3e-5, "warmup": 0.0}
    with pytest.raises(KeyError, match="recipes has no 'uniform'"):
        recipe(params, "uniform", 0.5)


def test_params_recipes_are_the_committed_grid_picks():
    """The default pipeline trains with `recipes`: they must be what the grid picked on validation."""
    table_file = ROOT / "reports" / "tables" / "recipe_grid.csv"
    if not table_file.is_file():
        pytest.skip("the recipe grid has not been run (make grid)")
    table = pd.read_csv(table_file)
    assert recipe_grid.recipe_mismatches(table, read_params()["recipes"]) == []
    assert table.groupby(["method", "budget"])["picked"].sum().eq(1).all()  # one pick per method and budget


def test_a_tampered_teacher_is_refused(tmp_path):
    model = hiap_core.extract(hiap_core.gate_vit(make_vit().eval()))
    folder = hiap_core.save_pruned(model, tmp_path / "dense" / "model")
    weights = folder / "model.safetensors"
    flipped = bytearray(weights.read_bytes())
    flipped[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="sha256 differs"):
        hiap_core.load_pruned(folder)
    cfg = config_from_params({"hiap": {"epochs": 1}}, "hiap", {"teacher": str(tmp_path / "dense")})
    with pytest.raises(ConfigError, match="teacher = .*sha256 differs"):
        models.load_teacher(cfg)


def test_the_grid_tunes_every_method_the_same_way_and_picks_on_validation(monkeypatch):
    """Each lr without warmup, then the best with warmup; the pick is the best val_acc, whatever test says;
    the baselines are cut to HiAP's picked run (the transplant keeps its units)."""
    calls = []

    def fake_run(params, method, name, overrides, restart_changed=True, reports=True):
        calls.append((method, name, overrides))
        lr, warm = overrides["optim.lr"], overrides["optim.warmup_epochs"]
        val = {"finetune": -abs(lr - 3e-5), "hiap": -abs(lr - 1e-3)}.get(method, -abs(lr - 2e-4)) + (1e-5 if warm else 0)
        return {"macs_fraction": 0.5, "val_acc": 0.9 + val, "test_acc": 0.9 - val}  # test would pick the other way

    monkeypatch.setattr(recipe_grid, "study_run", fake_run)
    monkeypatch.setattr("hiap_core.train.runs.landed_macs_fraction", lambda name: 0.5)
    params = read_params()
    params["recipe_grid"] = {"lr": [3e-5, 2e-4, 1e-3], "warmup": 0.1, "budgets": ["moderate", "harsh"], "seed": 0}
    table = recipe_grid.run_grid(params)
    base = params["baselines"]
    at = {b: sum(b in budgets for budgets in base["reach"].values()) for b in ("moderate", "harsh")}
    assert len(table) == 4 * (1 + 2 * (1 + len(base["methods"])) + at["moderate"] + at["harsh"])
    chosen = recipe_grid.picks(table)
    assert chosen["finetune"] == [{"macs": 1.0, "lr": 3e-5, "warmup": 0.1}]
    assert [c["lr"] for c in chosen["hiap"]] == [1e-3, 1e-3] and [c["macs"] for c in chosen["hiap"]] == [0.67, 0.2]
    assert all(c["lr"] == 2e-4 and c["warmup"] == 0.1 for c in chosen["uniform"])
    picked_hiap = table[(table["method"] == "hiap") & table["picked"]]["run"].tolist()
    transplants = [o for m, _, o in calls if m == "transplant"]
    assert {Path(o["structure"]).name for o in transplants} == set(picked_hiap)
    assert "recipes.finetune" in recipe_grid.recipe_mismatches(table, {"finetune": [{"macs": 1.0, "lr": 1e-3, "warmup": 0}]})[0]


def test_saved_model_files_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        folder = hiap_core.save_pruned(hiap_core.extract(hiap_core.gate_vit(make_vit().eval())), tmp_path / "m")
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in folder.iterdir()}
    assert modes == {"model.safetensors": 0o644, "architecture.json": 0o644}


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_holder(tmp_path):
    from hiap_core.core.files import exclusive_lock

    cfg = config_from_params({"dense": {"epochs": 1}}, "dense", {"out": str(tmp_path / "run"), "progress": False})
    (tmp_path / "run").mkdir()
    with exclusive_lock(tmp_path / "run" / run_folder.LOCK_FILE):  # this process stands for the first run
        with pytest.raises(ConfigError, match=f"in use by another run \\(process {os.getpid()}\\)"):
            engine.Trainer(cfg).run()
    with exclusive_lock(tmp_path / "run" / run_folder.LOCK_FILE):  # released, and a stale lock file is no obstacle
        pass


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from hiap_core.core.files import exclusive_lock

    lock = tmp_path / "x.lock"
    code = (
        f"from hiap_core.core.files import exclusive_lock\nwith exclusive_lock({str(lock)!r}):\n    import time; time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(200):
        if lock.is_file() and lock.read_text().strip() == str(holder.pid):
            break
        time.sleep(0.05)
    with pytest.raises(RuntimeError, match=f"held by process {holder.pid}"):
        with exclusive_lock(lock):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with exclusive_lock(lock):
        assert lock.read_text() == str(os.getpid())


TINY = {
    "data": {"dataset": "fashion_mnist", "val_size": 128, "train_subset": 256, "test_subset": 128},
    "model": {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
    "dense": {"epochs": 1, "batch_size": 64},
    "baselines": {"epochs": 1, "batch_size": 64},
}


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="make data")
def test_cached_teacher_logits_equal_the_live_teachers_forward(tmp_path):
    from hiap_core.train import teacher_logits

    engine.train(config_from_params(TINY, "dense", {"out": str(tmp_path / "dense"), "progress": False}))
    cfg = config_from_params(
        TINY, "finetune", {"teacher": str(tmp_path / "dense"), "out": str(tmp_path / "ft"), "progress": False}
    )
    teacher_logits.compute(cfg, tmp_path / "logits")
    cached = data.load_teacher_logits(
        config_from_params(TINY, "finetune", {"teacher": str(tmp_path / "dense"), "teacher_logits": str(tmp_path / "logits")}),
        models.teacher_fingerprint(cfg),
    )
    loader = data.build_loaders(cfg.data, 28, 64, seed=0).train
    loader.views = True
    teacher = models.load_teacher(cfg)
    for x, _, views in loader:  # flips included (data.augment: flip)
        with torch.no_grad():
            torch.testing.assert_close(cached[views], teacher(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="another teacher's weights"):
        data.load_teacher_logits(cfg.__class__(**{**cfg.__dict__, "teacher_logits": str(tmp_path / "logits")}), "0" * 64)
    live = engine.train(cfg)
    fast = engine.train(
        config_from_params(
            TINY,
            "finetune",
            {
                "teacher": str(tmp_path / "dense"),
                "teacher_logits": str(tmp_path / "logits"),
                "out": str(tmp_path / "ft2"),
                "progress": False,
            },
        )
    )
    assert fast["test_acc"] == pytest.approx(live["test_acc"], abs=0.01)  # the same training up to float rounding


def test_a_teacher_logits_cache_vouches_for_itself_on_read(tmp_path):
    """A cache with flipped bits was used, and a truncated one was a safetensors traceback: each is one line."""
    from safetensors.torch import save_file

    logits, folder = torch.randn(8, 10), tmp_path / "logits"
    folder.mkdir()
    path = folder / data.LOGITS_FILE
    cfg = config_from_params(TINY, "finetune", {"teacher": str(tmp_path / "dense"), "teacher_logits": str(folder)})
    metadata = {"teacher_sha256": "t", "images_sha256": "i", "logits_sha256": data.tensor_sha256(logits)}
    flipped = logits.clone()
    flipped[3, 4] = -flipped[3, 4]
    cases = [
        ({"logits": flipped}, metadata, "holds other values than it was written with"),
        (
            {"logits": logits},
            {k: v for k, v in metadata.items() if k != "logits_sha256"},
            "records no sha256 of its values \\(an older cache\\)",
        ),
        ({"logits": logits}, metadata, "not a readable logits cache \\(corrupt or truncated\\)"),
    ]
    for tensors, written, message in cases:
        save_file(tensors, str(path), metadata=written)
        if "truncated" in message:
            path.write_bytes(path.read_bytes()[:-7])
        with pytest.raises(ConfigError, match=f"{message}; remake it") as err:
            data.load_teacher_logits(cfg, "t")
        assert "\n" not in str(err.value)
    save_file({"logits": logits}, str(path), metadata=metadata)
    with pytest.raises(ConfigError, match="another teacher's weights"):  # the values check out: the next check speaks
        data.load_teacher_logits(cfg, "another")


def test_teacher_logits_into_a_folder_it_cannot_write_are_refused_before_the_teacher_is_read(tmp_path, monkeypatch):
    from hiap_core.train import teacher_logits

    def no_teacher(cfg):
        raise AssertionError("the teacher was read before the output folder was checked")

    monkeypatch.setattr(teacher_logits, "load_teacher", no_teacher)
    (tmp_path / "a_file").write_text("")
    cfg = config_from_params(TINY, "finetune", {"teacher": str(tmp_path / "dense")})
    with pytest.raises(ConfigError, match="--out = .*a_file/logits.*cannot write there"):
        teacher_logits.compute(cfg, tmp_path / "a_file" / "logits")


def test_a_pipeline_stage_waits_for_the_process_training_its_run(tmp_path):
    import threading

    from hiap_core.core.files import exclusive_lock

    lock, waited, got = tmp_path / "x.lock", [], threading.Event()

    def stage():
        with exclusive_lock(lock, wait=waited.append):
            got.set()

    with exclusive_lock(lock):
        thread = threading.Thread(target=stage)
        thread.start()
        thread.join(timeout=1.0)
        assert waited == [str(os.getpid())] and not got.is_set()  # told whom it waits for, and waits
    thread.join(timeout=10)
    assert got.is_set()


def test_each_method_with_a_cost_floor_runs_at_exactly_the_budgets_above_it():
    """params.yaml `baselines.reach` against the cuts themselves on the default model: every budget a method
    can reach within 0.5% is listed for it, and none it cannot (the frontier marks each floor)."""
    from hiap_core.core.baselines import ANALYTIC_METHODS, baseline_cut, torch_pruning_cut

    params = read_params()
    dense = models.build_dense_model(config_from_params(params, "dense"))
    spec = hiap_core.describe(dense)
    for method, listed in params["baselines"]["reach"].items():
        reachable = []
        for budget, cut in params["budgets"].items():
            try:
                if method in ANALYTIC_METHODS:
                    baseline_cut(spec, method, cut["target_macs"])
                else:
                    torch_pruning_cut(dense, cut["target_macs"])
                reachable.append(budget)
            except ValueError:
                pass
        assert listed == reachable, f"baselines.reach.{method}"
    for method in params["baselines"]["methods"]:  # every budget, and no floor of their own
        assert method not in params["baselines"]["reach"]


def test_a_borrowed_recipe_must_be_the_named_methods_pick():
    table = pd.DataFrame(
        [{"method": "uniform", "budget": "harsh", "target_macs": 0.2, "lr": 1e-3, "warmup": 0.1, "picked": True}]
    )
    good = {
        "uniform": [{"macs": 0.2, "lr": 1e-3, "warmup": 0.1}],
        "x": [{"macs": 0.2, "lr": 1e-3, "warmup": 0.1, "borrowed": "uniform"}],
    }
    assert recipe_grid.recipe_mismatches(table, good) == []
    bad = {**good, "x": [{"macs": 0.2, "lr": 2e-4, "warmup": 0.1, "borrowed": "uniform"}]}
    assert recipe_grid.recipe_mismatches(table, bad) == [
        "recipes.x: the entry borrowed from uniform at 0.2 is not its pick {'macs': 0.2, 'lr': 0.001, 'warmup': 0.1}"
    ]
