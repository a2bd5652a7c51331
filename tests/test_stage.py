"""The notebook runner of the DVC stages (hiap_core/stage.py): a failing notebook and Ctrl-C are one line each."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "hiap_core" / "stage.py"
ENV = {**os.environ, "IPYTHONDIR": str(ROOT / ".ipython"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def notebook(path: Path, *cells: str) -> Path:
    """A notebook whose first cell is papermill's `parameters` cell."""
    cells = [
        {"cell_type": "code", "id": f"c{i}", "execution_count": None, "metadata": {}, "outputs": [], "source": c}
        for i, c in enumerate(cells)
    ]
    cells[0]["metadata"]["tags"] = ["parameters"]
    kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": kernel}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def run(*args: str, **popen) -> subprocess.Popen:
    command = [sys.executable, str(RUNNER), "--log-level", "ERROR", "--no-progress-bar", "--stdout-file", "-", *args]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_the_stages_run_their_notebooks_through_the_runner():
    papermill = yaml.safe_load((ROOT / "dvc.yaml").read_text())["vars"][0]["papermill"]
    assert "python hiap_core/stage.py " in papermill


def test_a_notebook_that_raises_is_one_line_naming_the_cell_that_keeps_its_traceback(tmp_path):
    source = notebook(
        tmp_path / "nb.ipynb",
        "field = 'optim.lr'",
        "from hiap_core.train.config import ConfigError\nraise ConfigError(f'invalid config: {field} = -1: must be > 0')",
    )
    out = tmp_path / "out.ipynb"
    done = run(str(source), str(out), "-p", "field", "optim.wd")
    _, err = done.communicate(timeout=120)
    assert done.returncode == 1
    assert err.strip() == f"error: invalid config: optim.wd = -1: must be > 0 (its traceback: cell 3 of {out})"
    saved = json.loads(out.read_text())["cells"]
    assert any(o.get("ename") == "ConfigError" for c in saved for o in c.get("outputs", []))
    other = notebook(tmp_path / "bug.ipynb", "x = 1", "{}['missing']")  # not the project's error: its type is named
    done = run(str(other), str(tmp_path / "bug_out.ipynb"))
    _, err = done.communicate(timeout=120)
    assert done.returncode == 1 and err.strip().startswith("error: KeyError: 'missing' (its traceback: cell 2 of")


def test_ctrl_c_is_one_line_saying_how_to_go_on_and_leaves_no_kernel(tmp_path):
    """papermill printed a traceback of the kernel's closed sockets (a terminal's Ctrl-C: SIGINT to the group)."""
    source = notebook(tmp_path / "nb.ipynb", "x = 1", "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(120)")
    runner = run(str(source), str(tmp_path / "out.ipynb"), start_new_session=True)
    kernel = int(runner.stdout.readline())
    os.killpg(runner.pid, signal.SIGINT)
    _, err = runner.communicate(timeout=60)
    assert runner.returncode == 130
    assert (
        err.strip() == "interrupted: run `dvc repro` again; a run resumes from its last finished epoch, finished stages are kept"
    )
    for _ in range(100):  # the kernel sees its parent gone within a second
        if not Path(f"/proc/{kernel}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{kernel}").exists()
