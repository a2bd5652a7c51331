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


def study_run(params: dict, method: str, name: str, overrides: dict | None = None, restart_changed: bool = True) -> dict:
    """Train or resume `data/runs/<name>` and copy its metrics, history, gate states and budget trajectory
    to `reports/metrics/<name>*`; returns the metrics. `restart_changed` (the DVC stages): a run whose
    params changed starts over. Without it (a notebook run by hand) a finished run is kept as it is and
    shown, never retrained, and an unfinished one written with other params is refused."""
    cfg = config_from_params(params, method, {"out": str(RUNS / name), **(overrides or {})})
    if not restart_changed and (RUNS / name / "metrics.json").is_file():
        print(f"{name}: finished run kept as it is ({RUNS / name}); `dvc repro` retrains it if its params changed")
        metrics = run_metrics(name)
    else:
        metrics = Trainer(cfg, restart_on_config_change=restart_changed).run()
    for source, target in REPORT_FILES:
        if (RUNS / name / source).is_file():
            atomic_write(REPORTS / "metrics" / target.format(name), lambda p, s=source: shutil.copyfile(RUNS / name / s, p))
    return metrics


def sweep_overrides(params: dict, ratio: str) -> dict:
    """The settings of sweep run `ratio` (a key of `sweep.ratios`): its lambdas, its target (the ratio's own
    `target_macs` where it names one, else `sweep.target_macs`), and the sweep's length and data subset."""
    sweep = params["sweep"]
    if ratio not in sweep["ratios"]:
        raise KeyError(f"sweep ratio {ratio!r} is not in params.yaml sweep.ratios ({', '.join(sweep['ratios'])})")
    settings = sweep["ratios"][ratio]
    return {
        "hiap.lambda_macro": float(settings["lambda_macro"]),
        "hiap.lambda_micro": float(settings["lambda_micro"]),
        "target_macs": float(settings.get("target_macs", sweep["target_macs"])),
        "optim.epochs": sweep["epochs"],
        "data.train_subset": sweep["train_subset"],
    }


def run_metrics(name: str) -> dict:
    """metrics.json of the study run `name`."""
    return json.loads((RUNS / name / "metrics.json").read_text())
