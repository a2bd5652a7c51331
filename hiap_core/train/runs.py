"""The study's runs (DVC stages): one folder per run under `data/runs/`, its reports copied to `reports/metrics/`."""

from __future__ import annotations

import json
import shutil

from ..core.files import atomic_write
from .config import config_from_params
from .engine import Trainer
from .paths import REPORTS, RUNS

REPORT_FILES = (
    ("metrics.json", "{}.json"),
    ("history.csv", "{}_history.csv"),
    ("gates.csv", "{}_gates.csv"),
    ("budget.csv", "{}_budget.csv"),
)


def study_run(params: dict, method: str, name: str, overrides: dict | None = None) -> dict:
    """Train or resume `data/runs/<name>` (restarting it when its params changed) and copy its metrics,
    history, gate states and budget trajectory to `reports/metrics/<name>*`; returns the metrics."""
    cfg = config_from_params(params, method, {"out": str(RUNS / name), **(overrides or {})})
    metrics = Trainer(cfg, restart_on_config_change=True).run()
    for source, target in REPORT_FILES:
        if (RUNS / name / source).is_file():
            atomic_write(REPORTS / "metrics" / target.format(name), lambda p, s=source: shutil.copyfile(RUNS / name / s, p))
    return metrics


def run_metrics(name: str) -> dict:
    """metrics.json of the study run `name`."""
    return json.loads((RUNS / name / "metrics.json").read_text())
