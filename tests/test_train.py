import json
import re
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_FASHION_MODEL, needs_cuda
from safetensors.torch import load_file

import hiap_core
from hiap_core.train import device, engine, models, objective, run_folder
from hiap_core.train.config import ConfigError, RunConfig, apply_overrides, config_from_params

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"dataset": "fashion_mnist", "val_size": 128, "train_subset": 384, "test_subset": 128},
    "model": TINY_FASHION_MODEL,
    "dense": {"epochs": 2, "batch_size": 64, "lr": 0.002, "warmup_epochs": 0.5},
    "hiap": {"epochs": 3, "batch_size": 64, "lr": 0.001, "lambda_macro": 2.0, "lambda_micro": 1.0, "gate_lr": 0.2},
    "baselines": {"epochs": 1, "batch_size": 64, "lr": 0.001},
}
needs_fashion = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="make data")


def tiny_cfg(method, out, **overrides):
    flat = {"out": str(out), "progress": False, **overrides}
    return config_from_params(TINY, method, flat)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("make data")
    out = tmp_path_factory.mktemp("dense")
    metrics = engine.train(tiny_cfg("dense", out))
    return out, metrics


def test_a_runs_metrics_name_the_machine_and_threads_its_bits_depend_on(dense_run):
    out, metrics = dense_run
    assert json.loads((out / "metrics.json").read_text())["machine"] == metrics["machine"]
    assert metrics["machine"]["threads"] == torch.get_num_threads() and metrics["machine"]["torch"] == torch.__version__
    assert metrics["machine"]["cpu"] and metrics["machine"]["python"]


@pytest.mark.parametrize(
    "method, overrides, field",
    [
        ("bogus", {}, "method"),
        ("dense", {"data.dataset": "mnist"}, "data.dataset"),
        ("dense", {"optim.epochs": 0}, "optim.epochs"),
        ("hiap", {"teacher": "x", "hiap.lambda_macro": -1.0}, "hiap.lambda_macro"),
        ("hiap", {"teacher": "x", "hiap.tau_min": 3.0}, "hiap.tau_min"),
        ("uniform", {"teacher": "x", "target_macs": 1.5}, "target_macs"),
        ("uniform", {"teacher": "x"}, "target_macs"),
        ("hiap", {}, "teacher"),
        ("dense", {"model.name": "not_a_model"}, "model.name"),
        ("dense", {"model.name": "resnet18"}, "model.name"),  # a timm model, not a ViT: before any data is read
        ("dense", {"model.name": "swin_tiny_patch4_window7_224"}, "model.name"),
        ("dense", {"model.name": "vit_tiny_patch16_224"}, "model.name"),  # patch 16 does not tile 28x28 images
        ("dense", {"model.patch_size": 5}, "model.patch_size"),
        ("dense", {"optim.lr": "fast"}, "optim.lr"),
        ("dense", {"optim.batch_size": 1.5}, "optim.batch_size"),
        ("dense", {"data.root": "/nonexistent", "optim.lr": -1.0}, "optim.lr"),  # reported before any data is read
        ("hiap", {"teacher": "x", "hiap.search_fraction": 0.0}, "hiap.search_fraction"),
        ("hiap", {"teacher": "x", "hiap.gate_forward": "fuzzy"}, "hiap.gate_forward"),
        ("dense", {"optim.amp": "fp8"}, "optim.amp"),
        ("dense", {"target_macs": 0.5}, "target_macs"),  # was written into the dense run's metrics, unused
        ("finetune", {"teacher": "x", "target_macs": 0.5}, "target_macs"),
        ("dense", {"optim.compile": "yes"}, "optim.compile"),
    ],
)
def test_invalid_config_is_one_line_naming_the_field(method, overrides, field):
    with pytest.raises(ConfigError) as err:
        config_from_params(TINY, method, overrides)
    message = str(err.value)
    assert "\n" not in message and f"{field} = " in message


def test_unknown_override_field_is_rejected():
    with pytest.raises(ConfigError, match="unknown field 'optim.learning_rate'"):
        apply_overrides(RunConfig(), ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="expected field=value"):
        apply_overrides(RunConfig(), ["optim.lr"])


def test_config_from_params_reads_stage_groups(tmp_path):
    cfg = config_from_params(TINY, "uniform", {"teacher": "t", "target_macs": 0.5})
    assert cfg.optim.epochs == 1 and cfg.optim.lr == 0.001  # from `baselines`
    assert cfg.model.embed_dim == 32 and cfg.hiap.kd_alpha == 0.5
    cli = config_from_params(TINY, "hiap", ["teacher=t", "hiap.lambda_macro=4", "optim.epochs=7"])
    assert cli.hiap.lambda_macro == 4.0 and cli.optim.epochs == 7


def test_lr_schedule_warms_up_then_decays_to_min():
    factors = [objective.lr_factor(s, 100, 10, 0.01) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.01, abs=1e-3)


def test_param_groups_exclude_gates_norms_and_biases_from_decay():
    from conftest import make_vit

    model = hiap_core.gate_vit(make_vit())
    cfg = tiny_cfg("hiap", "x", teacher="t")
    decay, no_decay, gates = hiap_core.param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.gate_lr)
    assert gates["lr"] == cfg.optim.gate_lr and gates["weight_decay"] == 0
    assert {id(p) for p in gates["params"]} == {id(p) for p in hiap_core.gate_parameters(model)}
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert {"pos_embed", "cls_token"} <= {names[id(p)] for p in no_decay["params"]}
    assert sum(len(g["params"]) for g in (decay, no_decay, gates)) == len(list(model.parameters()))


@needs_fashion
def test_dense_hiap_and_baselines_end_to_end(dense_run, tmp_path):
    dense_dir, dense_metrics = dense_run
    assert dense_metrics["macs_fraction"] == 1.0 and 0 < dense_metrics["test_acc"] <= 1
    teacher = hiap_core.load_pruned(dense_dir / "model")
    assert sum(p.numel() for p in teacher.parameters()) == dense_metrics["params"]

    hiap = engine.train(tiny_cfg("hiap", tmp_path / "hiap", teacher=str(dense_dir)))
    history = pd.read_csv(tmp_path / "hiap" / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3]
    assert {"val_acc", "train_task", "train_macro", "train_micro", "train_feas", "tau", "expected_macs", "hard_macs"} <= set(
        history
    )
    assert history["tau"].is_monotonic_decreasing and history["tau"].iloc[-1] == pytest.approx(0.5, rel=0.1)
    gates = pd.read_csv(tmp_path / "hiap" / "gates.csv")
    # 6 steps an epoch, 9 of search: the start, every 5 steps, the search's end, its first frozen step
    assert sorted(gates["step"].unique()) == [0, 5, 9, 10] and len(gates) == 4 * 2
    assert gates["epoch"].max() == pytest.approx(10 / 6)
    closing = pd.read_csv(tmp_path / "hiap" / "closing.csv")
    assert set(closing["kind"]) == {"head", "value_dim", "ffn", "neuron"}
    final = hiap_core.describe(hiap_core.load_pruned(tmp_path / "hiap" / "model"))
    open_neurons = closing[(closing["kind"] == "neuron") & (closing["closed_step"] < 0)].groupby("layer").size()
    assert [layer.mlp_hidden or 0 for layer in final.layers] == [int(open_neurons.get(i, 0)) for i in range(2)]
    assert {"layer", "heads", "value_dims", "ffn_on", "neurons"} <= set(gates)
    pruned = hiap_core.load_pruned(tmp_path / "hiap" / "model")
    assert hiap_core.count_macs(pruned) == hiap["macs"] == history["hard_macs"].iloc[-1]
    assert json.loads((tmp_path / "hiap" / "metrics.json").read_text())["test_acc"] == hiap["test_acc"]

    for method, target in (("uniform", 0.6), ("l1_ffn", 0.7), ("uniform_heads", 0.6), ("torch_pruning_heads", 0.6)):
        metrics = engine.train(tiny_cfg(method, tmp_path / method, teacher=str(dense_dir), target_macs=target))
        assert abs(metrics["macs_fraction"] / target - 1) <= 0.005
        pruned = hiap_core.load_pruned(tmp_path / method / "model")
        assert hiap_core.count_macs(pruned) == metrics["macs"]
        if method.endswith("_heads"):  # the head count of the lowest validation loss before fine-tuning
            losses = {int(heads): loss for heads, loss in metrics["cut"]["val_loss_by_heads"].items()}
            assert len(losses) > 1 and metrics["cut"]["heads"] == min(losses, key=losses.get)
            assert {len(layer.heads) for layer in pruned.spec.layers} == {metrics["cut"]["heads"]}


@needs_fashion
def test_budget_exact_run_lands_on_the_target(dense_run, tmp_path):
    target = 0.6
    metrics = engine.train(tiny_cfg("hiap", tmp_path, teacher=str(dense_run[0]), target_macs=target))
    assert abs(metrics["macs_fraction"] / target - 1) <= 0.01
    assert hiap_core.count_macs(hiap_core.load_pruned(tmp_path / "model")) == metrics["macs"]
    budget = metrics["budget"]
    assert budget["cost"] == "macs" and budget["target_fraction"] == target
    assert budget["cost_fraction"] == pytest.approx(metrics["macs_fraction"])
    assert budget["missed_target"] is False and budget["max_penalty_scale"] >= budget["final_penalty_scale"]
    assert budget["cost_fraction_before_rounding"] == pytest.approx(
        budget["expected_fraction_at_freeze"] * (1 + budget["hardened_vs_expected_gap"])
    )
    trajectory = pd.read_csv(tmp_path / "budget.csv")
    # every optimizer step of the search: hiap.search_fraction 0.5 of 3 epochs x 384/64
    assert list(trajectory["step"]) == list(range(1, 9 + 1))
    assert trajectory["target_fraction"].iloc[0] < 1 and trajectory["target_fraction"].iloc[-1] == target
    assert (trajectory["lambda_macro"] == 2 * trajectory["lambda_micro"]).all()  # the ratio is kept
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["penalty_scale"].iloc[-1] == pytest.approx(trajectory["penalty_scale"].iloc[-1])


@needs_fashion
def test_latency_cost_run_lands_on_a_latency_target(dense_run, tmp_path):
    """`hiap.cost: latency` drives the same penalties and budget from a cost table (here a made-up one in
    which heads are dear: the run must land on the target in table units, not in MACs)."""
    spec = hiap_core.load_pruned(dense_run[0] / "model").spec
    table = {
        "unit": "ms",
        "spec": spec.dense().to_dict(),
        "coefficients": {"static": 2.0, "head": 1.0, "value_dim": 0.01, "neuron": 0.005},
    }
    (tmp_path / "table.json").write_text(json.dumps(table))
    cfg = tiny_cfg(
        "hiap",
        tmp_path / "run",
        teacher=str(dense_run[0]),
        **{"hiap.cost": "latency", "hiap.cost_table": str(tmp_path / "table.json"), "hiap.target_latency": 0.7},
    )
    metrics = engine.train(cfg)
    costs = hiap_core.load_cost_table(tmp_path / "table.json", spec)
    final = hiap_core.load_pruned(tmp_path / "run" / "model").spec
    fraction = hiap_core.spec_cost(final, costs) / hiap_core.spec_cost(spec.dense(), costs)
    assert metrics["budget"]["cost"] == "latency" and metrics["budget"]["cost_fraction"] == pytest.approx(fraction)
    assert abs(fraction / 0.7 - 1) <= 0.01
    assert engine.train(cfg) == metrics  # the same table: the finished run is resumed, not retrained
    table["coefficients"]["head"] = 0.5  # re-measured under the same path: the run it would resume is another
    (tmp_path / "table.json").write_text(json.dumps(table))
    with pytest.raises(ConfigError, match=r"different config \(hiap.cost_table's coefficients\)"):
        engine.train(cfg)


def test_an_unreadable_cost_table_is_one_error_naming_its_field_once(tmp_path):
    """It read "invalid config: hiap.target_latency = 1.0: invalid config: hiap.cost_table = ...": two fields,
    one of them fine."""
    from hiap_core.train.pruning import check_budget

    table = tmp_path / "cost_table.json"
    table.write_text("{}")
    latency = {"hiap.cost": "latency", "hiap.target_latency": 0.5, "hiap.cost_table": str(table)}
    with pytest.raises(ConfigError) as err:
        check_budget(tiny_cfg("hiap", tmp_path / "run", teacher="t", **latency))
    message = str(err.value)
    assert message.startswith("invalid config: hiap.cost_table = ") and message.count("invalid config") == 1
    assert "target_latency" not in message and "\n" not in message


def test_baselines_reach_targets_or_say_why():
    from conftest import cifar_vit_tiny

    dense = cifar_vit_tiny()
    dense_macs = hiap_core.count_macs(dense)
    for method in ("uniform", "l1_ffn"):
        for target in (0.67, 0.5):
            pruned = hiap_core.prune_to_target(dense, method, target)
            assert abs(hiap_core.count_macs(pruned) / dense_macs / target - 1) <= 0.005
    l1 = hiap_core.structure_summary(hiap_core.prune_to_target(dense, "l1_ffn", 0.5))
    assert list(l1["heads"][:-1]) == [3] * 6  # attention untouched
    with pytest.raises(ValueError, match="attention cost is a floor"):
        hiap_core.prune_to_target(dense, "l1_ffn", 0.1)


@needs_fashion
def test_wrong_or_missing_teacher_is_a_clear_error(dense_run, tmp_path):
    with pytest.raises(ConfigError, match=r"run the dense stage \(method dense\) first"):
        engine.train(tiny_cfg("hiap", tmp_path / "a", teacher=str(tmp_path / "none")))
    with pytest.raises(ConfigError, match="does not match the model config"):
        engine.train(tiny_cfg("hiap", tmp_path / "b", teacher=str(dense_run[0]), **{"model.embed_dim": 64}))


def test_offline_pretrained_checkpoint_missing_is_a_clear_error():
    cfg = RunConfig(
        method="hiap",
        model=hiap_core.train.config.ModelConfig(name="deit_tiny_patch16_224", pretrained="/no/such.pth", num_classes=1000),
    )
    with pytest.raises(ConfigError, match="file not found"):
        models.build_dense_model(cfg)


@pytest.mark.parametrize("content", ["random bytes", "a training checkpoint"])
def test_an_unloadable_pretrained_file_is_one_line(tmp_path, content):
    path = tmp_path / "weights.pth"
    if content == "random bytes":
        path.write_bytes(os.urandom(4096))
    else:  # what a user may take for weights: the engine's checkpoint of a gated run
        torch.save({"model": {"blocks.0.attn.head_gate.logits": torch.zeros(3)}, "optimizer": {}, "epoch": 1}, path)
    cfg = RunConfig(
        method="hiap",
        model=hiap_core.train.config.ModelConfig(name="deit_tiny_patch16_224", pretrained=str(path), num_classes=10),
    )
    with pytest.raises(ConfigError, match="cannot be loaded into deit_tiny_patch16_224 .*not a training checkpoint") as err:
        models.build_dense_model(cfg)
    assert "\n" not in str(err.value)


def test_an_infeasible_budget_is_refused_before_any_data_or_teacher_is_read(tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("read before the budget was checked")

    monkeypatch.setattr(engine, "build_loaders", must_not_run)
    monkeypatch.setattr(engine, "load_teacher", must_not_run)
    with pytest.raises(ConfigError, match="target_macs = 0.01: .*below .*smallest model") as err:
        engine.train(tiny_cfg("hiap", tmp_path / "run", teacher=str(tmp_path / "no_teacher"), target_macs=0.01))
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()
    # the baselines' cuts too (they were a traceback after the data and the teacher loaded)
    for method, match in (
        ("uniform", "uniform cannot reach 0.010"),
        ("l1_ffn", "l1_ffn cannot reach .* attention cost is a floor"),
    ):
        with pytest.raises(ConfigError, match=f"target_macs = 0.01: {match}") as err:
            engine.train(tiny_cfg(method, tmp_path / method, teacher=str(tmp_path / "no_teacher"), target_macs=0.01))
        assert "\n" not in str(err.value) and not (tmp_path / method).exists()


@needs_fashion
def test_a_refused_run_leaves_no_empty_folder_and_a_killed_write_no_temporary(dense_run, tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(ConfigError, match="target_macs"):
        engine.train(tiny_cfg("hiap", out, teacher=str(dense_run[0]), target_macs=0.001))  # below every feasible model
    assert not out.exists()
    existing = tmp_path / "kept"
    (existing / "model").mkdir(parents=True)
    leftovers = [existing / ".checkpoint.abc123.tmp.pt", existing / "model" / ".model.x1.tmp.safetensors"]
    for path in leftovers:  # what a kill -9 during an atomic write leaves
        path.write_bytes(b"half a file")
    engine.train(tiny_cfg("dense", existing))
    assert not any(path.exists() for path in leftovers)
    assert (existing / "metrics.json").is_file()


@pytest.mark.parametrize("damage", ["flipped bytes", "deleted"])
def test_a_finished_run_whose_model_was_damaged_saves_it_again_from_its_checkpoint(dense_run, tmp_path, capsys, damage):
    """Under `dvc repro` a damaged model was refused downstream while its own stage called the run "finished,
    kept", so rerunning never repaired it: the final files come again from the checkpoint, the same bytes."""
    cfg = tiny_cfg("uniform", tmp_path / "run", teacher=str(dense_run[0]), target_macs=0.6)
    first = engine.train(cfg)
    weights = tmp_path / "run" / "model" / "model.safetensors"
    saved = weights.read_bytes()
    if damage == "deleted":
        weights.unlink()
    else:
        weights.write_bytes(saved[:-64] + bytes(64))
    capsys.readouterr()
    again = engine.Trainer(cfg, restart_on_config_change=True).run()
    assert "finished, but" in capsys.readouterr().err and weights.read_bytes() == saved
    assert {k: v for k, v in again.items() if k != "train_time_s"} == {k: v for k, v in first.items() if k != "train_time_s"}
    hiap_core.load_pruned(tmp_path / "run" / "model")


@needs_fashion
def test_nan_loss_stops_with_a_clear_message_keeping_the_checkpoint(dense_run, tmp_path, monkeypatch):
    out = tmp_path / "fresh"  # created by the run: a failure after writing keeps it, lock file included
    cfg = tiny_cfg("hiap", out, teacher=str(dense_run[0]))
    original, calls = engine.step_loss, []

    def poisoned(*args):
        terms = original(*args)
        calls.append(1)
        if len(calls) > 7:  # second epoch (6 steps per epoch)
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(engine, "step_loss", poisoned)
    with pytest.raises(engine.TrainingDiverged, match="non-finite loss at epoch 2.*checkpoint.*is kept"):
        engine.train(cfg)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert (out / run_folder.LOCK_FILE).is_file()  # another process may be waiting on that file: it stays


def cli(args, **kwargs):
    env = {**os.environ, "CI": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "hiap_core.train", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def write_params(path):
    import yaml

    path.write_text(yaml.safe_dump(TINY))
    return path


@needs_fashion
@pytest.mark.parametrize(
    "search", [["hiap.search_fraction=1.0"], ["hiap.search_fraction=0.3"]], ids=["search_to_the_end", "frozen_before_the_kill"]
)
def test_killed_run_resumes_to_the_same_result(dense_run, tmp_path, search):
    params = write_params(tmp_path / "params.yaml")
    # budget-exact mode: the controller's state must survive the kill too; with search_fraction 0.3 the gates
    # freeze in epoch 1 (step 5 of 18), before the checkpoint the run resumes from
    common = ["--params", str(params), "--method", "hiap", "--set", f"teacher={dense_run[0]}", "target_macs=0.6", *search]
    full = cli([*common, "--out", str(tmp_path / "full")])
    assert full.wait(timeout=300) == 0, full.stdout.read()

    killed = cli([*common, "--out", str(tmp_path / "killed")])
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.05)
    # killed as soon as epoch 1 is saved: somewhere in epoch 2 (the tiny run's epochs take well under a second)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists(), "the run finished before it was killed"
    resumed = cli([*common, "--out", str(tmp_path / "killed")])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resuming" in output

    a, b = (load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("full", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ["epoch_time_s", "train_images_per_s"]
    pd.testing.assert_frame_equal(*(pd.read_csv(tmp_path / run / "history.csv").drop(columns=drop) for run in ("full", "killed")))
    for report in ("gates.csv", "budget.csv"):
        pd.testing.assert_frame_equal(*(pd.read_csv(tmp_path / run / report) for run in ("full", "killed")))
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("full", "killed")]
    assert metrics[0]["structure"] == metrics[1]["structure"] and metrics[0]["budget"] == metrics[1]["budget"]
    if search == ["hiap.search_fraction=0.3"]:
        assert metrics[0]["structure"]["search_steps"] == 5 and metrics[0]["structure"]["settled_step"] <= 5


@needs_fashion
def test_rerun_with_a_different_config_refuses_to_mix_checkpoints(dense_run, tmp_path):
    params = write_params(tmp_path / "params.yaml")
    run = cli(["--params", str(params), "--method", "dense", "--out", str(tmp_path / "d"), "--set", "optim.epochs=1"])
    assert run.wait(timeout=300) == 0
    again = cli(
        ["--params", str(params), "--method", "dense", "--out", str(tmp_path / "d"), "--set", "optim.lr=0.1", "optim.epochs=1"]
    )
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 2 and "different config (optim.lr)" in output and "Traceback" not in output


@needs_fashion
def test_cli_exits_non_zero_when_training_diverges_and_saves_no_model(tmp_path):
    params = write_params(tmp_path / "params.yaml")
    out = tmp_path / "x"
    run = cli(["--params", str(params), "--method", "dense", "--out", str(out), "--set", "optim.lr=1e6", "optim.min_lr=0"])
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 2 and "error: " in output and "non-finite" in output and "Traceback" not in output, output
    assert not (out / "model").exists() and not (out / "metrics.json").exists()


@needs_fashion
@pytest.mark.parametrize("sets", [["--set", "hiap.tau_min=5", "teacher=t"], ["--set", "hiap.tau_min=5", "--set", "teacher=t"]])
def test_cli_reports_bad_config_in_one_line_without_traceback(tmp_path, sets):
    """Every override counts, however many `--set` flags carry them (a later flag used to drop the earlier)."""
    params = write_params(tmp_path / "params.yaml")
    run = cli(["--params", str(params), "--method", "hiap", "--out", str(tmp_path / "x"), *sets])
    output = run.communicate(timeout=120)[0]
    assert run.returncode == 2 and output.strip().count("\n") == 0 and "hiap.tau_min" in output


@needs_fashion
def test_torchrun_two_process_gloo_matches_one_process(dense_run, tmp_path):
    params = write_params(tmp_path / "params.yaml")
    common = ["--params", str(params), "--method", "hiap", "--set", f"teacher={dense_run[0]}", "optim.epochs=2"]
    single = cli([*common, "--out", str(tmp_path / "one")])
    assert single.wait(timeout=300) == 0, single.stdout.read()
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "hiap_core.train", *common, "--out", str(tmp_path / "two")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert ddp.stdout.count("final:") == 1  # rank-0-only logging
    one, two = (load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("one", "two"))
    assert one.keys() == two.keys()
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-3
    m1, m2 = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two"))
    assert m1["macs"] == m2["macs"] and abs(m1["test_acc"] - m2["test_acc"]) <= 2 / 128


def test_stage_groups_may_train_on_a_subset_and_profiles_merge(tmp_path):
    params = {**TINY, "hiap": {**TINY["hiap"], "train_subset": 100}}
    assert config_from_params(params, "hiap", {"teacher": "t"}).data.train_subset == 100
    assert config_from_params(params, "dense").data.train_subset == TINY["data"]["train_subset"]

    from hiap_core.train import profiles

    file = tmp_path / "params.yaml"
    file.write_text("# kept comment\ndata:\n  dataset: fashion_mnist  # inline\n  train_subset: null\nhiap:\n  epochs: 3\n")
    profiles.apply("paper", file)
    text = file.read_text()
    assert "# kept comment" in text and "dataset: cifar10" in text and "epochs: 200" in text
    assert profiles.applied_profile(text) == "paper" and text.startswith("# profile: paper ")
    profiles.apply("paper", file)  # again: the same file, marked once
    assert file.read_text() == text
    with pytest.raises(SystemExit, match="has the 'paper' profile.*git checkout .*then apply 'smoke'"):
        profiles.apply("smoke", file)  # smoke's seeds and budgets would stay under paper's, and the reverse
    assert file.read_text() == text


@needs_fashion
def test_gate_gradients_match_the_analytic_penalty_gradients(dense_run):
    from hiap_core.core.cost import unit_costs
    from hiap_core.measure.gate_gradients import gate_gradients, net_push

    params = {**TINY, "hiap": {**TINY["hiap"], "init_logit": 2.0}}
    grads = gate_gradients(params, dense_run[0], batches=2)
    spec = hiap_core.load_pruned(dense_run[0] / "model").spec
    costs, dense_prunable = unit_costs(spec), hiap_core.dense_prunable_macs(spec)
    p = torch.sigmoid(torch.tensor(2.0)).item()
    slope = p * (1 - p)  # d sigmoid / d logit at init_logit
    by_kind = grads.groupby("kind")
    assert by_kind.size().to_dict() == {"head": 2 * 2, "value": 2 * 32, "block": 2 * 1, "neuron": 2 * 64}
    head, value, neuron = (by_kind.get_group(kind) for kind in ("head", "value", "neuron"))
    assert head["macro"].tolist() == pytest.approx([costs.alpha * slope / dense_prunable] * 4, rel=1e-5)
    assert head["micro"].tolist() == pytest.approx([costs.beta * 16 * p * slope / dense_prunable] * 4, rel=1e-5)
    assert (value["macro"] == 0).all() and (neuron["macro"] == 0).all()
    assert value["micro"].tolist() == pytest.approx([costs.beta * p * slope / dense_prunable] * 64, rel=1e-5)
    assert grads["task"].map(math.isfinite).all() and (grads["task"] != 0).any()
    push = net_push(grads, lambda_macro=1.0, lambda_micro=0.0, lambda_feas=0.0, scale=2.0)
    assert push.tolist() == pytest.approx((grads["task"] + 2.0 * grads["macro"]).tolist())


def test_unwritable_or_full_out_is_refused_before_any_training(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"out = .*file/run': cannot write there"):
        engine.train(tiny_cfg("dense", tmp_path / "file" / "run"))
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 2**20})())
    with pytest.raises(ConfigError, match="only 1 MiB free"):
        engine.train(tiny_cfg("dense", tmp_path / "full"))


def test_corrupt_checkpoint_is_named_refused_by_the_cli_and_moved_aside_by_pipelines(tmp_path):
    cfg = tiny_cfg("dense", tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"")  # e.g. copied from a full disk
    with pytest.raises(ConfigError, match=r"checkpoint.pt is corrupt or not a checkpoint .*: delete it to start the run over"):
        engine.Trainer(cfg, device.Dist()).folder.load_checkpoint(torch.device("cpu"))
    assert engine.Trainer(cfg, device.Dist(), restart_on_config_change=True).folder.load_checkpoint(torch.device("cpu")) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt.corrupt"]


def test_empty_or_mismatched_teacher_is_one_line_naming_the_key(tmp_path):
    (tmp_path / "empty" / "model").mkdir(parents=True)
    with pytest.raises(ConfigError, match="teacher = .*model.safetensors not found.*rerun the dense stage"):
        models.load_teacher(tiny_cfg("hiap", tmp_path / "a", teacher=str(tmp_path / "empty")))
    wide = tiny_cfg("dense", tmp_path / "w", **{"model.embed_dim": 64})
    teacher = hiap_core.extract(hiap_core.gate_vit(models.build_dense_model(wide)))
    with pytest.raises(ConfigError) as err:
        models.build_model(tiny_cfg("hiap", tmp_path / "b", teacher="wide"), teacher)
    assert "\n" not in str(err.value) and "does not match the model config: size mismatch for cls_token" in str(err.value)


def test_training_set_smaller_than_a_batch_names_the_fields():
    from hiap_core.train import data

    images = data.ArrayDataset(torch.zeros(10, 1, 28, 28, dtype=torch.uint8), torch.zeros(10, dtype=torch.int64), 10)
    with pytest.raises(ConfigError, match=r"optim.batch_size = 64: the training set has 10 images \(data.train_subset\)"):
        data.TensorLoader(images, 64, 0.5, 0.5, True, 0)


def test_evaluation_shows_a_progress_bar(capsys):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    batches = [(torch.randn(2, 4), torch.tensor([0, 1]))]
    acc, loss = engine.evaluate(model, batches, device.Dist(), show=True)
    assert "evaluating" in capsys.readouterr().err and 0 <= acc <= 1 and math.isfinite(loss)


@needs_fashion
def test_non_finite_test_metrics_fail_without_saving_a_model_or_a_nan_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg("dense", tmp_path, **{"optim.epochs": 2})
    original = engine.evaluate
    calls = []

    def blown_up_in_epoch_2(*args):
        calls.append(1)
        acc, loss = original(*args)
        return (acc, float("nan")) if len(calls) == 2 else (acc, loss)

    monkeypatch.setattr(engine, "evaluate", blown_up_in_epoch_2)
    with pytest.raises(engine.TrainingDiverged, match="after epoch 2 .*last good checkpoint .* is kept, no model saved"):
        engine.train(cfg)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "model").exists()


@needs_fashion
def test_amp_auto_on_cpu_trains_bit_identical_weights_to_amp_off(dense_run, tmp_path):
    """On CPU `amp: auto` enters no autocast: HiAP (teacher forward, gates, penalties, budget control) trains
    exactly the weights of full fp32."""
    assert device.autocast_dtype("auto", torch.device("cpu")) is None
    weights = []
    for amp in ("auto", "off"):
        cfg = tiny_cfg("hiap", tmp_path / amp, teacher=str(dense_run[0]), target_macs=0.6, **{"optim.amp": amp})
        engine.train(cfg)
        weights.append(load_file(str(tmp_path / amp / "model" / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_explicit_mixed_precision_without_a_cuda_gpu_is_refused_in_one_line(amp, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU runs it")
    with pytest.raises(ConfigError) as err:
        engine.Trainer(tiny_cfg("dense", tmp_path, **{"optim.amp": amp}), device.Dist())
    message = str(err.value)
    assert "\n" not in message and f"optim.amp = '{amp}': needs a CUDA GPU" in message and "use auto or off" in message


def test_amp_off_written_bare_in_yaml_means_off():
    """YAML 1.1 reads `amp: off` (and `--set optim.amp=off`) as false."""
    assert config_from_params({"dense": {"amp": False}}, "dense").optim.amp == "off"
    assert apply_overrides(RunConfig(), ["optim.amp=off"]).validate().optim.amp == "off"


def test_a_config_field_added_later_counts_as_its_default_when_a_checkpoint_lacks_it():
    now = RunConfig(method="hiap").to_dict()
    older = RunConfig(method="hiap").to_dict()
    del older["optim"]["amp"], older["optim"]["compile"]
    assert run_folder.changed_fields(older, now) == []
    explicit = RunConfig(method="hiap").to_dict()
    explicit["optim"]["amp"] = "off"
    assert run_folder.changed_fields(older, explicit) == ["optim.amp"]  # the old code ran auto: a change
    assert run_folder.changed_fields(explicit, now) == ["optim.amp"]
    del older["hiap"]["search_fraction"]  # added with a default that changed training: never assumed
    assert run_folder.changed_fields(older, now) == ["hiap.search_fraction"]


def test_a_field_a_method_does_not_read_never_makes_its_checkpoint_stale():
    """Dense and the baselines train no gates: HiAP's penalty settings and gate_lr are not theirs (their DVC
    stages do not track them either); the KD settings are; HiAP reads them all."""
    saved = RunConfig(method="uniform").to_dict()
    now = RunConfig(method="uniform").to_dict()
    now["hiap"].update(lambda_macro=7.0, cost_table="elsewhere.json")
    now["optim"]["gate_lr"] = 0.3
    assert run_folder.changed_fields(saved, now) == []
    now["hiap"]["kd_alpha"] = 0.9
    assert run_folder.changed_fields(saved, now) == ["hiap.kd_alpha"]
    saved["method"] = now["method"] = "hiap"
    assert run_folder.changed_fields(saved, now) == ["hiap.cost_table", "hiap.kd_alpha", "hiap.lambda_macro", "optim.gate_lr"]


@needs_fashion
def test_a_finished_run_checkpointed_before_amp_existed_resumes_and_another_amp_is_refused(dense_run, tmp_path):
    import shutil

    run = tmp_path / "dense"
    shutil.copytree(dense_run[0], run)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    del state["config"]["optim"]["amp"], state["config"]["optim"]["compile"], state["scaler"]
    torch.save(state, run / "checkpoint.pt")
    assert engine.train(tiny_cfg("dense", run))["test_acc"] == dense_run[1]["test_acc"]  # resumed after its last epoch
    with pytest.raises(ConfigError, match=r"different config \(optim.amp\)"):
        engine.train(tiny_cfg("dense", run, **{"optim.amp": "off"}))


@needs_fashion
def test_compiled_training_trains_the_same_weights_and_saves_plain_keys(dense_run, tmp_path, monkeypatch):
    """`optim.compile` compiles the training network only: checkpoints keep the model's own parameter names
    (no `_orig_mod.`). Dynamo's eager backend runs the traced graphs with the same kernels (CPU-quick)."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    engine.train(tiny_cfg("dense", tmp_path, **{"optim.compile": True}))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert not any(key.startswith("_orig_mod") for key in state["model"])
    a, b = (load_file(str(folder / "model" / "model.safetensors")) for folder in (dense_run[0], tmp_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_losses_and_penalties_stay_fp32_under_autocast():
    """The forwards run under autocast, the task loss and HiAP's penalties outside it: fp32, and the penalties
    equal to those computed without autocast (CPU bf16 autocast stands in for CUDA's here)."""
    from conftest import make_vit

    teacher = make_vit()
    pruner = hiap_core.Pruner(make_vit(), total_steps=10)
    student = pruner.model.train()
    cfg = tiny_cfg("hiap", "x", teacher="t")
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    mixed = objective.step_loss(student, x, y, cfg, teacher, pruner, torch.bfloat16)
    full = objective.step_loss(student, x, y, cfg, teacher, pruner)
    assert all(term.dtype == torch.float32 for term in mixed.values())
    assert all(torch.equal(mixed[k], full[k]) for k in ("macro", "micro", "feas"))
    mixed["loss"].backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in student.parameters())


@needs_cuda
def test_bf16_training_step_and_autocast_evaluation_on_cuda():
    from conftest import make_vit

    device = torch.device("cuda")
    assert device.autocast_dtype("auto", device) == torch.bfloat16
    teacher = make_vit().to(device)
    pruner = hiap_core.Pruner(make_vit(), total_steps=10)
    student = pruner.model.to(device).train()
    cfg = tiny_cfg("hiap", "x", teacher="t")
    x, y = torch.randn(8, 3, 16, 16, device=device), torch.randint(0, 5, (8,), device=device)
    terms = objective.step_loss(student, x, y, cfg, teacher, pruner, torch.bfloat16)
    assert all(term.dtype == torch.float32 and torch.isfinite(term) for term in terms.values())
    terms["loss"].backward()
    gates = hiap_core.gate_parameters(student)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in gates)
    acc, loss = engine.evaluate(student, [(x.cpu(), y.cpu())], device.Dist(device=device), False, torch.bfloat16)
    assert 0 <= acc <= 1 and math.isfinite(loss)


@needs_cuda
@needs_fashion
def test_fp16_run_on_cuda_keeps_its_loss_scale_in_the_checkpoint_and_pins_its_batches(tmp_path):
    cfg = tiny_cfg("dense", tmp_path, **{"optim.amp": "fp16", "optim.epochs": 1})
    trainer = engine.Trainer(cfg, device.Dist(device=torch.device("cuda")))
    metrics = trainer.run()
    assert math.isfinite(metrics["test_loss"])
    assert all(t.is_pinned() for t in next(iter(trainer.train_loader)))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["scaler"]["scale"] > 0


@needs_fashion
def test_a_student_of_a_retrained_teacher_is_another_run(dense_run, tmp_path, capsys):
    """The checkpoint keeps the sha256 of the teacher's weights: the same folder with new weights (a teacher
    retrained in place) is refused by hand, naming it, and started over by a pipeline stage."""
    import shutil

    teacher = tmp_path / "dense"
    shutil.copytree(dense_run[0], teacher)
    student = tiny_cfg("finetune", tmp_path / "ft", teacher=str(teacher))
    first = engine.train(student)
    assert engine.train(tiny_cfg("finetune", tmp_path / "ft", teacher=str(teacher)))["test_acc"] == first["test_acc"]
    weights = teacher / "model" / "model.safetensors"
    model = hiap_core.load_pruned(teacher / "model")
    with torch.no_grad():
        model.head.bias.add_(1.0)
    hiap_core.save_pruned(model, teacher / "model")
    assert weights.read_bytes() != (dense_run[0] / "model" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="teacher's weights"):
        engine.train(tiny_cfg("finetune", tmp_path / "ft", teacher=str(teacher)))
    trainer = engine.Trainer(tiny_cfg("finetune", tmp_path / "ft", teacher=str(teacher)), restart_on_config_change=True)
    capsys.readouterr()
    trainer.run()
    assert "another config (teacher's weights): starting over" in capsys.readouterr().out


@needs_fashion
def test_the_gates_search_from_the_first_step_under_a_weight_warmup(dense_run, tmp_path):
    """A warmup of the weights' rate does not hold the gates: at a harsh budget their warmed-up rate froze
    the logits while the controller, seeing no cost move, wound the penalty scale up to 22,000 (10% accuracy)."""
    cfg = tiny_cfg("hiap", tmp_path, teacher=str(dense_run[0]), target_macs=0.3, **{"optim.warmup_epochs": 1.0})
    trainer = engine.Trainer(cfg)
    trainer._prepare()
    trainer.net = trainer.model
    x, y = next(iter(trainer.loaders.train))
    trainer._train_step(0, 0, x, y, {})
    rates = {bool(g.get("gates")): g["lr"] for g in trainer.optimizer.param_groups}
    assert rates[True] == pytest.approx(cfg.optim.gate_lr)  # step 0 of the cosine: the full rate
    assert rates[False] == pytest.approx(cfg.optim.lr / trainer.warmup)  # the weights warm up


@pytest.mark.parametrize(("override", "field"), [("hiap.init_logit=-3", "hiap.init_logit"), ("seed=1e30", "seed")])
def test_values_outside_their_sense_are_refused_in_one_line(override, field):
    with pytest.raises(ConfigError, match=f"invalid config: {re.escape(field)} ="):
        config_from_params(TINY, "hiap", ["teacher=t", override])


def test_a_named_timm_vit_gets_the_datasets_channels():
    model_cfg = hiap_core.train.config.ModelConfig(name="vit_tiny_patch16_224", img_size=32, in_chans=1, num_classes=10)
    model = models.build_dense_model(RunConfig(method="dense", model=model_cfg))  # 16-px patches tile 32, not 28
    assert model.patch_embed.proj.in_channels == 1


def test_a_budget_exact_run_off_its_target_says_so_loudly_and_marks_its_metrics(capsys):
    """The landing check the engine runs at the end of every budget-exact run (a 5% miss; tolerance 0.5%)."""
    from types import SimpleNamespace

    cfg = tiny_cfg("hiap", "unused", teacher="t", target_macs=0.5)
    trainer = SimpleNamespace(cfg=cfg, out=Path("runs/b50"), dist=SimpleNamespace(main=True))
    trainer._log = lambda message, warning=False: engine.Trainer._log(trainer, message, warning)  # the engine's own
    missed = {"cost_fraction": 0.525, "target_fraction": 0.5, "unit": "MACs"}
    engine.Trainer._check_landed(trainer, missed)
    assert missed["missed_target"] is True
    printed = capsys.readouterr()  # a warning: on stderr, not among the progress lines
    assert "WARNING [b50]: missed its budget: 0.5250 of dense MACs against a target of 0.5000" in printed.err
    assert "missed its budget" not in printed.out
    landed = {"cost_fraction": 0.501, "target_fraction": 0.5, "unit": "MACs"}
    engine.Trainer._check_landed(trainer, landed)
    assert landed["missed_target"] is False and capsys.readouterr().out == ""


def test_two_phase_trains_exactly_hiaps_post_freeze_steps_on_exactly_its_units(dense_run, tmp_path):
    """The two-phase row at HiAP's compute: HiAP's kept units on the teacher's weights, fine-tuned for the steps
    HiAP trained after its freeze, so that its search plus this fine-tune cost exactly HiAP's steps."""
    from hiap_core.train.runs import post_freeze_epochs

    search_fraction = 1 / 3  # 3 epochs: the gates freeze after 1, HiAP trains 2 more on its structure
    params = {**TINY, "hiap": {**TINY["hiap"], "search_fraction": search_fraction}}
    teacher = str(dense_run[0])
    hiap = engine.train(
        tiny_cfg("hiap", tmp_path / "hiap", teacher=teacher, target_macs=0.6, **{"hiap.search_fraction": search_fraction})
    )
    epochs = {"optim.epochs": post_freeze_epochs(params)}
    two_phase = engine.train(tiny_cfg("two_phase", tmp_path / "two", teacher=teacher, structure=str(tmp_path / "hiap"), **epochs))
    structure = hiap["structure"]
    assert two_phase["steps"] == structure["total_steps"] - structure["search_steps"] == 2 * structure["search_steps"]
    assert two_phase["total_steps"] == hiap["total_steps"] == hiap["steps"]
    assert hiap_core.load_pruned(tmp_path / "two" / "model").spec == hiap_core.load_pruned(tmp_path / "hiap" / "model").spec
    assert two_phase["macs"] == hiap["macs"]
    with pytest.raises(ValueError, match="whole number"):  # 3 epochs at the default 0.5: 1.5 epochs after the freeze
        post_freeze_epochs({**TINY, "hiap": {**TINY["hiap"], "search_fraction": 0.5}})


def test_later_stages_read_a_hiap_runs_landing_and_units_from_its_hash_checked_model(dense_run, tmp_path, monkeypatch):
    """A hand-edited metrics.json (macs 0.67 -> 0.47) made the uniform baseline cut to 0.47 while the HiAP model
    sat at 0.67; an edited closing.csv would move a transplant's units the same way. Both are refused."""
    from hiap_core.train import runs

    monkeypatch.setattr(runs, "RUNS", tmp_path)
    teacher = str(dense_run[0])
    hiap = engine.train(tiny_cfg("hiap", tmp_path / "hiap", teacher=teacher, target_macs=0.6))
    assert runs.landed_macs_fraction("hiap") == hiap["macs_fraction"]
    metrics = json.loads((tmp_path / "hiap" / "metrics.json").read_text())
    (tmp_path / "hiap" / "metrics.json").write_text(json.dumps({**metrics, "macs_fraction": 0.47}))
    with pytest.raises(ConfigError, match=r"says macs_fraction 0.47, its model 0.\d+: the metrics were changed") as err:
        runs.run_overrides(TINY, "uniform", teacher="dense", match_run="hiap", lr_warmup={"lr": 1e-3, "warmup": 0})
    assert "\n" not in str(err.value)
    closing = pd.read_csv(tmp_path / "hiap" / "closing.csv")
    kept = closing.index[(closing["kind"] == "neuron") & (closing["closed_step"] < 0)]
    closing.loc[kept[:3], "closed_step"] = 0  # three kept neurons marked closed
    closing.to_csv(tmp_path / "hiap" / "closing.csv", index=False)
    cfg = tiny_cfg("transplant", tmp_path / "t", teacher=teacher, structure=str(tmp_path / "hiap"))
    with pytest.raises(ConfigError, match="its closing.csv does not describe the units its model kept"):
        models.build_model(cfg, models.load_teacher(cfg))


def test_a_params_edit_while_a_stage_trains_fails_that_stage_naming_the_fields(tmp_path, monkeypatch):
    """control@0 trained 2 epochs while dvc.lock recorded `baselines.epochs: 3`, an edit made during the run (DVC
    hashes params when the stage ends). An edit of a group the run does not read passes."""
    import yaml

    from hiap_core.train import runs

    file = tmp_path / "params.yaml"
    file.write_text((ROOT / "params.yaml").read_text())
    monkeypatch.setattr(runs, "PARAMS", file)
    edits = []

    def training(params, method, name, overrides, restart_changed):  # the edit lands while the run trains
        edited = yaml.safe_load(file.read_text())
        edits[-1](edited)
        file.write_text(yaml.safe_dump(edited))
        return {"test_acc": 0.5}

    monkeypatch.setattr(runs, "study_run", training)
    edits.append(lambda p: p["latency"].update(batch1_runs=7))
    assert runs.stage_run("finetune", "control_s0", teacher="dense", seed=0) == {"test_acc": 0.5}
    edits.append(lambda p: p["baselines"].update(epochs=p["baselines"]["epochs"] + 1))
    with pytest.raises(
        ConfigError, match=r"params.yaml changed while control_s0 trained \(optim.epochs\): it trained on the values before"
    ):
        runs.stage_run("finetune", "control_s0", teacher="dense", seed=0)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_gates_learning_rate_follows_its_own_schedule(dense_run, tmp_path, schedule):
    cfg = tiny_cfg("hiap", tmp_path / "run", teacher=str(dense_run[0]), **{"optim.gate_lr_schedule": schedule, "optim.epochs": 1})
    trainer = engine.Trainer(cfg)
    trainer.run()
    gates = next(group for group in trainer.optimizer.param_groups if group.get("gates"))
    last = trainer.total_steps - 1  # the rate the last step used
    cosine = objective.lr_factor(last, trainer.total_steps, 0, cfg.optim.min_lr / cfg.optim.lr)
    assert gates["lr"] == pytest.approx(cfg.optim.gate_lr * (cosine if schedule == "cosine" else 1.0))
    assert cosine < 0.1  # the two schedules differ
