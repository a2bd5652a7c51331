"""dvc.yaml cannot drift: each stage's deps cover every module its code imports, and a params edit reruns
exactly the stages that read the edited value."""

import ast
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ruamel.yaml import YAML
from test_layers import closure, import_graph, imported_names, modules
from test_pipeline import repo_copy

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))


def stage_definitions() -> dict[str, dict]:
    """Each stage of `dvc.yaml` as DVC resolves it (foreach/matrix expanded, ${} filled in), with the
    params.yaml keys it tracks."""
    out = subprocess.run([DVC, "stage", "list", "--name-only"], cwd=ROOT, capture_output=True, text=True, check=True)
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        stages = {s.addressing: s for s in repo.index.stages}
        return {
            name: {
                "cmd": stages[name].cmd,
                "deps": [d.def_path for d in stages[name].deps if not isinstance(d, ParamsDependency)],
                "params": [key for d in stages[name].deps if isinstance(d, ParamsDependency) for key in d.params],
            }
            for name in out.stdout.split()
        }


def code_modules(cmd: str) -> set[str]:
    """hiap_core modules a stage's command runs: a notebook's imports, or `python -m <module>`. The notebook
    runner (hiap_core/stage.py, papermill's command line) is no dep, as papermill is not: it changes no output."""
    words = shlex.split(cmd)
    if any(w.endswith(".ipynb") for w in words):
        notebook = ROOT / next(w for w in words if w.endswith(".ipynb"))
        cells = json.loads(notebook.read_text())["cells"]
        source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        return imported_names(ast.parse(source), "__notebook__", False) | {"hiap_core"}
    return {words[words.index("-m") + 1]}


# Stages whose output is costly to remake and checked where it is read: a library edit must not rerun them.
# dense: the committed teacher (dvc.yaml says how to retrain it); teacher_logits: its file records the
# teacher's weights and the images it was made from, and every run checks both.
COMMITTED_OUTPUT_STAGES = {"dense", "teacher_logits"}


def test_every_module_a_stage_imports_is_covered_by_its_deps():
    graph = import_graph()
    files = modules()
    for name, stage in stage_definitions().items():
        if name in COMMITTED_OUTPUT_STAGES:
            assert not any(d.startswith("hiap_core") for d in stage["deps"]), f"stage {name} is meant not to track the code"
            continue
        deps = [d.rstrip("/") for d in stage["deps"]]
        for module in closure(graph, code_modules(stage["cmd"])):
            path = str(files[module].relative_to(ROOT))
            assert any(path == d or path.startswith(d + "/") for d in deps), f"stage {name} runs {path}, not in its deps"


def test_the_committed_teacher_is_up_to_date_for_dvc():
    """The dense stage has no checkpoint in git: if its command or notebook changes without `dvc commit dense`,
    `make repro` retrains the teacher from scratch (40 min) and every run below it (a new stage runner did)."""
    status = subprocess.run([DVC, "status", "--json", "dense"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {}, f"dense is stale: {status.stdout}; if the teacher is unchanged, `dvc commit dense`"


def test_a_fresh_clone_has_every_file_of_the_teacher_the_stages_read():
    """Only the dense stage's outputs of `data/runs/` are in git, and they are all a fresh clone's stages
    read of the teacher: the report reads its metrics and history (`run_metrics("dense")`), not only its model
    (a clone that lacked them failed in the report stage after 46 min of training)."""
    listed = subprocess.run(["git", "ls-files", "data/runs"], cwd=ROOT, capture_output=True, text=True, check=True)
    tracked = listed.stdout.split()
    outs = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["dense"]["outs"]
    committed = [name for out in outs for name in out if name.startswith("data/runs/")]
    assert set(committed) >= {"data/runs/dense/model", "data/runs/dense/metrics.json", "data/runs/dense/history.csv"}
    for out in committed:
        assert any(t == out or t.startswith(out + "/") for t in tracked), f"{out} is a committed output but not in git"
    assert all(any(t == o or t.startswith(o + "/") for o in committed) for t in tracked), "a file in data/runs no stage writes"


def notebook_groups(notebook: Path) -> set[str]:
    """The params.yaml groups a notebook reads: the keywords of its `study_params(...)` calls."""
    cells = json.loads(notebook.read_text())["cells"]
    tree = ast.parse("\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "study_params"]
    return {keyword.arg for call in calls for keyword in call.keywords}


def test_every_params_group_a_notebook_reads_is_tracked_by_its_stage():
    """Notebooks read params.yaml themselves (nothing injected but a run's settings): a group a notebook
    reads and its stage does not track would leave the stage stale when that group changes."""
    checked = 0
    for name, stage in stage_definitions().items():
        words = shlex.split(stage["cmd"])
        if not any(w.endswith(".ipynb") for w in words):
            continue
        assert "-f" not in words and "--parameters_file" not in words, f"stage {name} injects a whole params file"
        tracked = {key.split(".")[0] for key in stage["params"]}
        notebook = ROOT / next(w for w in words if w.endswith(".ipynb"))
        for group in notebook_groups(notebook):
            assert group in tracked, f"stage {name}: {notebook.name} reads params.yaml's {group}, which the stage does not track"
            checked += 1
    assert checked > 0


def placeholder_outputs(repo: Path) -> None:
    """A file or folder for every output, so `dvc commit` can record a consistent lock without running anything."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        for stage in dvc_repo.index.stages:
            for out in stage.outs:
                path = repo / out.def_path
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("placeholder\n")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder").write_text("placeholder\n")


def changed_stages(repo: Path) -> set[str]:
    status = subprocess.run([DVC, "status", "--json"], cwd=repo, capture_output=True, text=True, check=True)
    return set(json.loads(status.stdout))


@pytest.fixture(scope="module")
def committed_repo(tmp_path_factory) -> Path:
    repo = repo_copy(tmp_path_factory.mktemp("dvc") / "repo")
    shutil.rmtree(repo / "reports" / "notebooks")
    placeholder_outputs(repo)
    subprocess.run([DVC, "commit", "--force", "--quiet"], cwd=repo, capture_output=True, text=True, check=True)
    assert changed_stages(repo) == set()
    return repo


def edited_params(repo: Path, edit) -> set[str]:
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    loader = YAML()
    params = loader.load(original)
    edit(params)
    with params_file.open("w") as f:
        loader.dump(params, f)
    try:
        return changed_stages(repo)
    finally:
        params_file.write_text(original)


def test_adding_a_budget_reruns_only_its_runs_and_the_reports(committed_repo):
    def add_budget(params):
        params["budgets"]["light"] = {"target_macs": 0.8, "lambda_macro": 0.05, "lambda_micro": 0.025}

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    methods, seeds = params["baselines"]["methods"], params["seeds"]
    runs = {f"hiap@light-{s}" for s in seeds} | {f"baselines@{m}-light-{s}" for m in methods for s in seeds}
    expected = runs | {"report", "latency", "budget_report"}
    assert edited_params(committed_repo, add_budget) == expected


def test_editing_one_sweep_ratio_reruns_only_that_sweep_run_and_the_report(committed_repo):
    def edit_ratio(params):
        params["sweep"]["ratios"]["r5_1"]["lambda_macro"] = 0.4

    assert edited_params(committed_repo, edit_ratio) == {"sweep@r5_1", "report"}


def test_every_table3_method_fine_tunes_for_the_same_steps_on_the_same_data():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in ("epochs", "train_subset", "batch_size"):
        assert params["baselines"][key] == params["hiap"][key], f"baselines.{key} differs from hiap.{key}"


# Files under reports/ that no stage writes: made by hand, on machines the pipeline does not run on or by a
# one-off study whose runs no stage keeps (`make levers`).
HAND_MADE_REPORTS = {
    "reports/README.md",  # the results in words
    "reports/benchmarks/gpu.json",  # `make bench-gpu` on a lent GPU machine
    "reports/benchmarks/gpu_engine_runs.csv",  # the GPU training-engine runs behind gpu.json
    "reports/benchmarks/fanout_threads.json",  # `make fanout-threads`: how to spend 2 cores on fine-tunes (issue 32)
    "reports/tables/search_levers.csv",  # `make levers`: the search's levers on validation (issue 29)
    "reports/tables/search_levers.md",
    "reports/schedule/runs.csv",  # `make schedule`: the ranking against schedule length (issue 30)
    "reports/schedule/gaps.csv",
    "reports/schedule/gaps.md",
    "reports/schedule/gaps.png",
}


def stage_outputs() -> set[str]:
    """Every output path (files and folders) of the current dvc.yaml's stages."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {out.def_path for stage in repo.index.stages for out in stage.outs}


def test_every_file_under_reports_is_a_current_stage_output_or_hand_made():
    outputs = stage_outputs()
    stale = []
    for path in sorted((ROOT / "reports").rglob("*")):
        name = str(path.relative_to(ROOT))
        if path.is_file() and name not in HAND_MADE_REPORTS and not any(name == o or name.startswith(o + "/") for o in outputs):
            stale.append(name)
    assert stale == [], f"no stage writes these (remove them, or name them in HAND_MADE_REPORTS): {stale}"


def test_dvc_lock_names_only_current_stages():
    locked, current = set(yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]), set(stage_definitions())
    assert locked <= current, f"dvc.lock holds stages dvc.yaml no longer has: {sorted(locked - current)}"
