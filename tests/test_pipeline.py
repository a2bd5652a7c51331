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
    log = tmp / "dvc_repro.log"  # streamed, so a repro that hangs still names its last stage
    with log.open("w") as out:
        try:
            repro = subprocess.run(["dvc", "repro"], cwd=repo, env=ENV, stdout=out, stderr=subprocess.STDOUT, timeout=1500)
            returncode = repro.returncode
        except subprocess.TimeoutExpired:
            returncode = "timed out after 1500 s"
    output = log.read_text()
    stages = re.findall(r"Running stage '([^']+)'", output)
    assert returncode == 0, f"dvc repro: {returncode}, last stage {stages[-1:]}, log {log}:\n{output[-4000:]}"
    assert re.search(r"\[dense\] dense epoch 1/1 .* acc .* MACs .* elapsed, ~.* left", output), "no progress line"
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
        if metrics.name.endswith("_architecture.json"):  # the runs' specs, for the explorer
            continue
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


def notebooks_dvc_runs_as_they_are() -> set[str]:
    """The source notebooks a stage that `dvc repro` runs executes with nothing injected (no `-p`), as
    JupyterLab's Run All would."""
    stages = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]
    plain = set()
    for stage in stages.values():
        cmd = stage.get("do", stage)["cmd"]
        plain |= set() if stage.get("frozen") or " -p " in cmd else set(re.findall(r"notebooks/(\w+\.ipynb)", cmd))
    return plain


def figures_shown_and_no_tqdm_warning(name: str, nb) -> None:
    """Every figure a notebook writes to reports/figures is also shown as a PNG output, and no tqdm warning."""
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "TqdmWarning" not in stderr and "IProgress" not in stderr, f"{name}: {stderr[-500:]}"
    saved = sum(cell.source.count("save_figure(") for cell in nb.cells if cell.cell_type == "code")
    assert images >= saved, f"{name} writes {saved} figures to reports/figures but shows {images}"


def test_every_source_notebook_runs_all_without_parameters(smoke_repo, tmp_path):
    """JupyterLab's Run All: each notebook in notebooks/, nothing injected, reads params.yaml itself and
    runs top to bottom on the smoke runs (01 shows the finished dense run, it does not retrain it). A notebook
    that `dvc repro` ran as it is (no `-p`) was that Run All already: its executed copy is checked; the others
    (01, whose stages inject a run's settings, and the frozen recipe grid's 08) run here."""
    import nbclient
    import nbformat

    as_they_are = notebooks_dvc_runs_as_they_are()
    assert {"02_report.ipynb", "03_gate_evolution.ipynb"} <= as_they_are and "01_train.ipynb" not in as_they_are
    repo = tmp_path / "repo"  # a copy: the notebooks rewrite reports, the other test checks dvc status
    shutil.copytree(smoke_repo, repo, symlinks=True)
    dense_checkpoint = (repo / "data" / "runs" / "dense" / "checkpoint.pt").stat().st_mtime_ns
    for path in sorted((repo / "notebooks").glob("*.ipynb")):
        if path.name in as_they_are:
            nb = nbformat.read(repo / "reports" / "notebooks" / path.name, as_version=4)
            assert not any("injected-parameters" in c["metadata"].get("tags", []) for c in nb.cells), path.name
        else:
            nb = nbformat.read(path, as_version=4)
            nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(repo)}}).execute()
        figures_shown_and_no_tqdm_warning(path.name, nb)
    assert (repo / "data" / "runs" / "dense" / "checkpoint.pt").stat().st_mtime_ns == dense_checkpoint


def test_on_a_fresh_clone_the_explorer_opens_every_committed_run(smoke_repo, tmp_path, monkeypatch):
    """A fresh clone has the git-tracked outputs and the teacher, no run folders: the explorer lists every
    committed run, draws each, and 03's Run All shows the gate_evolution run beside its comparison."""
    import matplotlib.pyplot as plt
    import nbclient
    import nbformat

    from hiap_core.report import explorer

    repo = tmp_path / "clone"
    shutil.copytree(smoke_repo, repo, symlinks=True)
    for folder in [*(repo / "data" / "runs").iterdir(), repo / "data" / "imagenet"]:
        if folder.name != "dense":
            shutil.rmtree(folder)
    metrics = repo / "reports" / "metrics"
    committed = sorted(p.name.removesuffix("_architecture.json") for p in metrics.glob("*_architecture.json"))
    assert len(committed) >= 16 and {"hiap_harsh_s0", "uniform_harsh_s0", "finetune_s0", "latency_target"} <= set(committed)
    monkeypatch.setattr(explorer, "RUNS", repo / "data" / "runs")
    monkeypatch.setattr(explorer, "COMMITTED", metrics)
    assert explorer.run_names() == sorted({"dense", *committed})
    for name in committed:
        run = explorer.load_run(name)
        budget_exact = run.name.startswith(("hiap", "soft", "sweep", "latency"))  # HiAP runs: a budget trajectory
        assert run.total_steps > 0 and run.spec.layers and (run.budget is not None) == budget_exact
        plt.close(explorer.evolution_plot(run))

    nb = nbformat.read(repo / "notebooks" / "03_gate_evolution.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(repo)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    printed = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    assert f"finished runs: {', '.join(sorted({'dense', *committed}))}" in printed
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5  # evolution, heatmaps, trajectory, architecture, pair
    tables = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "hiap_harsh_s0" in tables and "uniform_harsh_s0" in tables  # the comparison table of the pair


def test_two_fanned_out_workers_write_the_runs_the_sequential_repro_wrote_and_dvc_records_them(smoke_repo, tmp_path):
    """`python -m hiap_core.fanout` over 2 local workers (1 thread each, as the smoke repro's runs had) rewrites
    the harsh HiAP runs and the baseline cut to them: the same model files, byte for byte, and every stage in
    dvc.lock; the moderate HiAP runs, up to date, are left alone."""
    pytest.importorskip("submitit")
    stages = ["hiap", "uniform"]
    fanned = shutil.copytree(smoke_repo, tmp_path / "fanned", symlinks=True)
    runs = sorted(p.name for p in (fanned / "data" / "runs").iterdir() if p.name.startswith(("hiap_harsh", "uniform_")))
    assert len(runs) == 4
    for name in runs:
        shutil.rmtree(fanned / "data" / "runs" / name)
    command = [sys.executable, "-m", "hiap_core.fanout", "--workers", "2", "--threads", "1", *stages]
    result = subprocess.run(command, cwd=fanned, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "wave 1: 2 stages, 2 at a time" in result.stdout and "wave 2: 2 stages" in result.stdout  # HiAP first
    assert "hiap@moderate" not in result.stdout

    def timeless(path: Path) -> dict:  # the wall times differ run to run
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "train_time_s"}

    for name in runs:
        left, right = smoke_repo / "data" / "runs" / name, fanned / "data" / "runs" / name
        assert (left / "model" / "model.safetensors").read_bytes() == (right / "model" / "model.safetensors").read_bytes()
        assert timeless(left / "metrics.json") == timeless(right / "metrics.json")
    status = subprocess.run(["dvc", "status", *stages], cwd=fanned, env=ENV, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout
