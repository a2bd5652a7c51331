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

# one xdist worker runs this module, so its module-scoped fixture is built once
pytestmark = pytest.mark.xdist_group("smoke_pipeline")

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
    # a frozen stage is not rerun, so its committed outputs come along, as in a fresh clone (the recipe grid)
    for name in ("tables/recipe_grid.csv", "tables/recipe_grid.md", "notebooks/08_recipe_grid.ipynb"):
        (target / "reports" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "reports" / name, target / "reports" / name)
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
        "data": {"dataset": "imagenet", "root": str(folder), "workers": 0, "val_size": 0},  # 12 images: no split
        "model": {
            "name": "deit_tiny_patch16_224",
            "img_size": 32,
            "in_chans": 3,
            "num_classes": 3,
            "pretrained": str(tmp / "deit_tiny.pth"),
        },
        "hiap": {"epochs": 1, "batch_size": 4, "lr": 0.0005, "warmup_epochs": 0},
    }
    with (repo / "params.yaml").open("w") as f:
        yaml.dump(params, f)


ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "CI": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory) -> Path:
    """A repository copy after a fresh `dvc repro` of the smoke profile: every run and report written once
    for the tests of this module."""
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("make data")
    tmp = tmp_path_factory.mktemp("smoke")
    repo = repo_copy(tmp / "repo")
    profiles.apply("smoke", repo / "params.yaml")
    enable_tiny_imagenet(repo, tmp)
    result = subprocess.run(["dvc", "repro"], cwd=repo, env=ENV, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert re.search(r"\[dense\] dense epoch 1/1 .* acc .* MACs .* elapsed, ~.* left", result.stdout), "no progress line"
    return repo


def test_smoke_profile_reproduces_every_report(smoke_repo):
    repo, env = smoke_repo, ENV

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
    for notebook in ("01_train_dense", "02_report", "03_gate_evolution", "04_latency", "06_cost_table", "07_budget_exact"):
        executed = (repo / "reports" / "notebooks" / f"{notebook}.ipynb").read_text()
        assert '"image/png"' in executed, f"the executed {notebook} shows no figure"
        assert "TqdmWarning" not in executed and "IProgress" not in executed, f"the executed {notebook} warns about tqdm"
    cells = json.loads((repo / "reports" / "notebooks" / "01_train_hiap_moderate_s0.ipynb").read_text())["cells"]
    injected = "".join(next(c for c in cells if "injected-parameters" in c["metadata"].get("tags", []))["source"])
    assert "run_name" in injected and "imagenet" not in injected and "data" not in injected, injected

    table2 = (repo / "reports" / "tables" / "table2_imagenet.md").read_text()
    assert "HiAP (this repo)" in table2 and "not run" not in table2
    pruned = hiap_core.load_pruned(repo / paths.IMAGENET_RUN.relative_to(paths.PROJECT_ROOT) / "model")
    assert pruned.spec.num_classes == 3

    status = subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout


def test_every_source_notebook_runs_all_without_parameters(smoke_repo, tmp_path):
    """JupyterLab's Run All: each notebook in notebooks/, nothing injected, reads params.yaml itself and
    runs top to bottom on the smoke runs (01 shows the finished dense run, it does not retrain it); every
    figure a notebook writes to reports/figures is also shown as a PNG output, and no tqdm warning."""
    import nbclient
    import nbformat

    repo = tmp_path / "repo"  # a copy: the notebooks rewrite reports, the other test checks dvc status
    shutil.copytree(smoke_repo, repo, symlinks=True)
    dense_checkpoint = (repo / "data" / "runs" / "dense" / "checkpoint.pt").stat().st_mtime_ns
    for path in sorted((repo / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(repo)}}).execute()
        outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
        images = sum("image/png" in o.get("data", {}) for o in outputs)
        stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
        assert "TqdmWarning" not in stderr and "IProgress" not in stderr, f"{path.name}: {stderr[-500:]}"
        saved = sum(cell.source.count("save_figure(") for cell in nb.cells if cell.cell_type == "code")
        assert images >= saved, f"{path.name} writes {saved} figures to reports/figures but shows {images}"
    assert (repo / "data" / "runs" / "dense" / "checkpoint.pt").stat().st_mtime_ns == dense_checkpoint
