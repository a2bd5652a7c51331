"""The GPU benchmark (`hiap_core.measure.gpu_bench`), tried on the CPU with a tiny ViT: it runs without dvc,
papermill or the plotting libraries, and writes finite, positive figures in the structure the README reads."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hiap_core
from hiap_core.measure import gpu_bench, states

ROOT = Path(__file__).resolve().parents[1]
NOT_ON_A_BARE_GPU_MACHINE = ("dvc", "papermill", "matplotlib", "seaborn", "ruamel", "nbformat", "onnx", "onnxruntime")


def numbers(value, path=""):
    """(path, number) of every number in a JSON value (booleans are flags, not figures)."""
    if isinstance(value, dict):
        return [n for key, v in value.items() for n in numbers(v, f"{path}.{key}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in numbers(v, f"{path}[{i}]")]
    return [(path, value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench") / "gpu.json"
    args = ["--device", "cpu", "--tiny", "--budget-s", "2", "--parts", "training", "inference", "--out", str(out)]
    code = (
        "import sys; from hiap_core.measure import gpu_bench\n"
        f"gpu_bench.main({args!r})\n"
        f"print('LOADED', sorted({{m.split('.')[0] for m in sys.modules}} & {set(NOT_ON_A_BARE_GPU_MACHINE)!r}))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(out.read_text()), run.stdout.splitlines()[-1]


def test_runs_without_dvc_papermill_or_plotting_libraries(tiny_result):
    assert tiny_result[1] == "LOADED []"


def test_writes_finite_positive_figures_for_every_step_precision_and_batch(tiny_result):
    result = tiny_result[0]
    assert all(math.isfinite(v) and v > 0 for _, v in numbers(result)), [p for p, v in numbers(result) if not v > 0]
    assert result["device"]["type"] == "cpu" and result["device"]["name"] and result["device"]["torch"] == torch.__version__
    training = {(r["model"], r["batch"], r["precision"]) for r in result["training"]}
    assert training == {("tiny_vit", b, p) for b in (4, 8) for p in ("fp32", "bf16")}
    for row in result["training"]:
        assert {f"{step}_step_images_per_s" for step in ("dense", "kd", "hiap", "hiap_frozen")} < set(row)
        assert "eval_images_per_s" in row
    assert [(r["batch"], round(r["macs_fraction"], 2)) for r in result["inference"]] == [(2, f) for f in gpu_bench.TINY_FRACTIONS]
    assert all(r["precision"] == "bf16" and r["optimized_layout"] in ("per_head", "padded") for r in result["inference"])
    assert [r["batch"] for r in result["loader"]] == [4, 8]


def test_estimates_the_paper_profile_from_the_study_runs(tiny_result):
    estimate = tiny_result[0]["paper_profile_estimate"]
    runs = {name: (r["runs"], r["epochs"], r["train_images"]) for name, r in estimate["runs"].items()}
    # params.yaml: 3 seeds, 5 budgets, 2 full-length baseline methods and two-phase at every budget, the 4 methods
    # with a cost floor at 4 + 4 + 4 + 2 budgets, 5 sweep ratios; the paper profile: its epochs, all 50k images
    assert runs == {
        "dense": (1, 200, 50_000),
        "hiap": (5 * 3 + 3 + 1, 200, 50_000),  # Table 3, the gate-forward ablation, the latency target
        "baselines": ((2 * 5 + 14) * 3 + 3, 200, 50_000),  # every baseline, the fine-tuning control
        "two_phase": (5 * 3, 190, 50_000),  # HiAP's 200 epochs less its 5% search
        "sweep": (5, 50, 50_000),
    }
    search = {"hiap": 0.05, "hiap_frozen": 0.95}  # the paper profile's gates search for 5% of each run
    steps = {name: r["steps"] for name, r in estimate["runs"].items()}
    assert steps == {"dense": {"dense": 1.0}, "hiap": search, "baselines": {"kd": 1.0}, "two_phase": {"kd": 1.0}, "sweep": search}
    assert set(estimate["hours"]) == {"fp32", "bf16"} and "hours = sum over runs" in estimate["formula"]
    for hours in estimate["hours"].values():
        assert hours["total"] == pytest.approx(sum(hours[name] for name in runs))


def test_a_cpu_run_must_name_its_output_and_cuda_needs_a_gpu(tmp_path):
    def cli(*args):
        command = [sys.executable, "-m", "hiap_core.measure.gpu_bench", *args]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)

    run = cli("--device", "cpu", "--tiny")
    assert run.returncode == 2 and "name its --out" in run.stderr
    if not torch.cuda.is_available():
        run = cli("--device", "cuda", "--out", str(tmp_path / "x.json"))
        assert run.returncode == 2 and "no CUDA GPU" in run.stderr


def test_onnx_runtime_beside_pytorch_on_the_cpu():
    pytest.importorskip("onnxruntime")
    rows = gpu_bench.bench_onnx_cpu(gpu_bench.TINY_WORKLOADS, 0.02, gpu_bench.TINY_FRACTIONS)
    assert [(r["batch"], round(r["macs_fraction"], 2)) for r in rows] == [(1, 1.0), (1, 0.5)]  # batch 64 > the tiny workload's 2
    assert all(r["pytorch_images_per_s"] > 0 and r["onnxruntime_images_per_s"] > 0 for r in rows)


def test_the_study_models_are_timed_where_their_folders_are(tmp_path, monkeypatch):
    dense, pruned = states.extracted_models(gpu_bench._tiny_vit, (0.5,))
    hiap_core.save_pruned(hiap_core.extract(hiap_core.gate_vit(dense)), tmp_path / "dense" / "model")
    hiap_core.save_pruned(pruned[0.5], tmp_path / "hiap_moderate_s0" / "model")
    monkeypatch.setattr(gpu_bench, "RUNS", tmp_path)
    (row,) = gpu_bench.bench_study_models(torch.device("cpu"), seconds=0.02)
    assert row["run"] == "hiap_moderate_s0" and row["macs_fraction"] == pytest.approx(0.5, abs=0.005)
    assert row["speedup"] > 0 and row["optimized_speedup"] > 0 and row["paper_batch1_speedup_at_33pct_cut"] == 1.44
    monkeypatch.setattr(gpu_bench, "RUNS", tmp_path / "none")
    assert gpu_bench.bench_study_models(torch.device("cpu"), seconds=0.02) == []
