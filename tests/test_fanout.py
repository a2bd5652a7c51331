"""The fan-out of the training stages (`python -m hiap_core.fanout`): over 2 local workers it writes the same
runs as a sequential `dvc repro` of the same stages, byte for byte, and DVC records every stage."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_pipeline import ENV, repo_copy

from hiap_core.train import profiles

pytest.importorskip("submitit")
STAGES = ["hiap", "uniform"]  # the smoke profile: HiAP at two budgets, and a baseline cut to its harsh runs


def run(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout


def timeless(path: Path) -> dict:
    """metrics.json without the wall times, which differ run to run."""
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "train_time_s"}


def test_two_workers_write_the_runs_a_sequential_repro_writes_and_dvc_records_them(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("make data")
    base = repo_copy(tmp_path / "base")
    profiles.apply("smoke", base / "params.yaml")
    run(["dvc", "repro", "teacher_logits"], base)  # the teacher and its logits, shared by both
    sequential, fanned = (shutil.copytree(base, tmp_path / name, symlinks=True) for name in ("sequential", "fanned"))
    run(["dvc", "repro", *STAGES], sequential)
    out = run([sys.executable, "-m", "hiap_core.fanout", "--workers", "2", "--threads", "1", *STAGES], fanned)
    assert "wave 1: 4 stages, 2 at a time" in out and "wave 2: 2 stages" in out  # HiAP first, then its baseline
    runs = sorted(p.name for p in (sequential / "data" / "runs").iterdir() if p.name.startswith(("hiap_", "uniform_")))
    assert len(runs) == 6
    for name in runs:
        left, right = sequential / "data" / "runs" / name, fanned / "data" / "runs" / name
        assert (left / "model" / "model.safetensors").read_bytes() == (right / "model" / "model.safetensors").read_bytes()
        assert timeless(left / "metrics.json") == timeless(right / "metrics.json")
        assert (left / "history.csv").read_text().count("\n") == (right / "history.csv").read_text().count("\n")
    assert "up to date" in run(["dvc", "status", *STAGES], fanned)
    locked = yaml.safe_load((fanned / "dvc.lock").read_text())["stages"]
    assert {f"hiap@{b}-{s}" for b in ("moderate", "harsh") for s in (0, 1)} | {"uniform@uniform-harsh-0"} <= set(locked)
