"""End to end: a fresh `dvc repro` of the whole study (smoke profile, ImageNet part enabled on a tiny
generated ImageFolder with a tiny DeiT) in a temporary copy of the repository."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ruamel.yaml import YAML

import hiap_core
from hiap_core.train import paths, profiles
from test_data import write_image_folder

ROOT = Path(__file__).resolve().parents[1]


def repo_copy(target: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        source = ROOT / name
        if source.is_file() and not name.startswith(("reports/", "data/runs/")):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    (target / "reports" / "notebooks").mkdir(parents=True)
    shutil.copy2(ROOT / "reports" / "README.md", target / "reports" / "README.md")
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    return target


def enable_tiny_imagenet(repo: Path, tmp: Path) -> None:
    import timm

    folder = write_image_folder(tmp / "imagenet", classes=3, per_class=4, size=40)
    teacher = timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=3)
    torch.save(teacher.state_dict(), tmp / "deit_tiny.pth")
    yaml = YAML()
    params = yaml.load((repo / "params.yaml").read_text())
    params["imagenet"] = {
        "enabled": True,
        "nproc_per_node": 2,
        "data": {"dataset": "imagenet", "root": str(folder), "workers": 0},
        "model": {"name": "deit_tiny_patch16_224", "img_size": 32, "num_classes": 3, "pretrained": str(tmp / "deit_tiny.pth")},
        "hiap": {"epochs": 1, "batch_size": 4, "lr": 0.0005, "warmup_epochs": 0},
    }
    with (repo / "params.yaml").open("w") as f:
        yaml.dump(params, f)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="make data")
def test_smoke_profile_reproduces_every_report(tmp_path):
    repo = repo_copy(tmp_path / "repo")
    profiles.apply("smoke", repo / "params.yaml")
    enable_tiny_imagenet(repo, tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "CI": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    readme = (repo / "reports" / "README.md").read_text()
    linked = re.findall(r"\]\(([^)]+)\)", readme)
    assert len(linked) >= 20
    for link in linked:
        path = repo / "reports" / link
        assert path.is_file() and path.stat().st_size > 0, f"reports/README.md links {link}, which the pipeline did not write"
    for metrics in (repo / "reports" / "metrics").glob("*.json"):
        assert {"test_acc", "macs", "params"} <= set(json.loads(metrics.read_text()))
    for notebook in ("00_sizing", "02_report", "03_gate_evolution", "04_latency", "05_imagenet"):
        assert (repo / "reports" / "notebooks" / f"{notebook}.ipynb").stat().st_size > 0

    table2 = (repo / "reports" / "tables" / "table2_imagenet.md").read_text()
    assert "HiAP (this repo)" in table2 and "not run" not in table2
    pruned = hiap_core.load_pruned(repo / paths.IMAGENET_RUN.relative_to(paths.PROJECT_ROOT) / "model")
    assert pruned.spec.num_classes == 3

    status = subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
