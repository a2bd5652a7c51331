"""The study's runs (DVC stages): one folder per run under `data/runs/`, its reports copied to `reports/metrics/`."""

from __future__ import annotations

import json
import math
import shutil

from ..core.cost import count_macs
from ..core.files import atomic_write
from .config import STAGE_GROUPS, TRANSPLANTS, ConfigError, config_from_params, load_params
from .engine import Trainer
from .models import load_model
from .paths import PARAMS, REPORTS, RUNS
from .run_folder import changed_fields

REPORT_FILES = (
    ("metrics.json", "{}.json"),
    ("history.csv", "{}_history.csv"),
    ("gates.csv", "{}_gates.csv"),
    ("budget.csv", "{}_budget.csv"),
    ("closing.csv", "{}_closing.csv"),
    ("model/architecture.json", "{}_architecture.json"),  # the extracted architecture: the explorer draws it
)


def study_run(
    params: dict, method: str, name: str, overrides: dict | None = None, restart_changed: bool = True, reports: bool = True
) -> dict:
    """Train or resume `data/runs/<name>` and (with `reports`) copy its metrics, history, gate states, closing
    steps, budget trajectory and architecture to `reports/metrics/<name>*`; returns the metrics.
    `restart_changed` (the DVC stages): a run whose params changed starts over. Without it (a notebook run by
    hand) a finished run is kept as it is and shown, never retrained, and an unfinished one written with other
    params is refused."""
    cfg = config_from_params(params, method, {"out": str(RUNS / name), **(overrides or {})})
    if not restart_changed and (RUNS / name / "metrics.json").is_file():
        print(f"{name}: finished run kept as it is ({RUNS / name}); `dvc repro` retrains it if its params changed")
        metrics = run_metrics(name)
    else:
        metrics = Trainer(cfg, restart_on_config_change=restart_changed).run()
    for source, target in REPORT_FILES if reports else ():
        if (RUNS / name / source).is_file():
            atomic_write(REPORTS / "metrics" / target.format(name), lambda p, s=source: shutil.copyfile(RUNS / name / s, p))
    return metrics


def stage_run(method: str, name: str, restart_changed: bool = True, **run_args) -> dict:
    """One run as its DVC stage trains it (`01_train.ipynb`): `study_run` with the overrides `run_overrides` gives
    for `run_args`, from params.yaml read twice. DVC records a stage's params when the stage ends, so an edit made
    while the run trained would be recorded but never trained: a run whose config the file no longer gives fails
    its stage in one line, and the next `dvc repro` trains it on the new values."""
    params = load_params(PARAMS)
    overrides = run_overrides(params, method, **run_args)
    metrics = study_run(params, method, name, overrides, restart_changed)
    now = load_params(PARAMS)
    trained = config_from_params(params, method, overrides).to_dict()
    changed = changed_fields(trained, config_from_params(now, method, run_overrides(now, method, **run_args)).to_dict())
    if changed:
        raise ConfigError(
            f"{PARAMS.name} changed while {name} trained ({', '.join(changed)}): it trained on the values before the "
            "edit, and DVC would record those after; run `dvc repro` again to train it on the new ones"
        )
    return metrics


def study_methods(params: dict, budget: str) -> list[str]:
    """The methods the study runs at `budget`: HiAP, `baselines.methods`, and the methods with a cost floor
    whose `baselines.reach` names it."""
    base = params["baselines"]
    return ["hiap", *base["methods"], *(m for m, budgets in base["reach"].items() if budget in budgets)]


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


def landed_macs_fraction(name: str) -> float:
    """The MACs fraction study run `name` landed on, as its hash-checked model file says, and refused when its
    metrics.json says otherwise: a later stage cuts to this number, and an edited JSON must not move it."""
    spec = load_model(RUNS / name, "match_run", "its HiAP stage").spec
    fraction = count_macs(spec) / count_macs(spec.dense())
    written = run_metrics(name)["macs_fraction"]
    if abs(written - fraction) > 1e-12:
        raise ConfigError(
            f"{RUNS / name / 'metrics.json'} says macs_fraction {written:.6g}, its model {fraction:.6g}: the metrics were "
            f"changed since the run wrote them; rerun its stage (`dvc repro --force` on it) or delete {RUNS / name}"
        )
    return fraction


def recipe(params: dict, method: str, fraction: float | None = None) -> dict:
    """The fine-tune recipe ({lr, warmup}: peak rate, warmup as a fraction of the run's steps) the recipe grid
    picked for `method` (params.yaml `recipes`) at the tuned budget nearest the MACs `fraction` in log (the
    best rate moves with the budget; None: the mildest). KeyError naming what is missing."""
    picks = params["recipes"].get(method)
    if not picks:
        raise KeyError(
            f"params.yaml recipes has no {method!r} (its methods: {', '.join(params['recipes'])}); run the recipe grid"
        )
    nearest = min(picks, key=lambda pick: abs(math.log(float(pick["macs"]) / (fraction or 1.0))))
    return {"lr": float(nearest["lr"]), "warmup": float(nearest["warmup"])}


def post_freeze_epochs(params: dict) -> int:
    """The epochs HiAP trains after its gates freeze (`hiap.epochs * (1 - search_fraction)`): the two-phase row's
    fine-tune, so that search plus fine-tune cost HiAP's steps (the baselines train on HiAP's data and batch).
    ValueError naming the fields when that is not a whole number of epochs."""
    hiap = params["hiap"]
    epochs = hiap["epochs"] * (1 - hiap["search_fraction"])
    if abs(epochs - round(epochs)) > 1e-9 or round(epochs) < 1:
        raise ValueError(
            f"hiap.epochs x (1 - hiap.search_fraction) = {epochs:g}: the two-phase row fine-tunes HiAP's post-freeze "
            "epochs, so it must be a whole number >= 1; choose epochs and search_fraction to make it one"
        )
    return round(epochs)


def run_overrides(
    params: dict,
    method: str,
    *,
    teacher: str | None = None,
    seed: int | None = None,
    budget: str | None = None,
    match_run: str | None = None,
    target_latency: float | None = None,
    gate_forward: str | None = None,
    sweep_ratio: str | None = None,
    lr_warmup: dict | None = None,
) -> dict:
    """The config overrides of one study run (the settings `01_train.ipynb` is given): the teacher's folder
    (and its cached logits), seed, HiAP's budget (a key of `budgets`), the HiAP run a baseline is cut to the
    MACs of (a transplant: whose units it keeps), a latency target, the gate forward, a sweep ratio; and the
    fine-tune recipe, `lr_warmup` ({lr, warmup}) or else the one the recipe grid picked for the method at
    the run's budget."""
    overrides: dict = {"progress": False}
    if teacher:  # and its logits, cached once for every fine-tune (the teacher_logits stage)
        overrides.update(teacher=str(RUNS / teacher), teacher_logits=str(RUNS / f"{teacher}_logits"))
    if seed is not None:
        overrides["seed"] = int(seed)
    if budget:
        overrides["target_macs"] = float(params["budgets"][budget]["target_macs"])
    if match_run and method in TRANSPLANTS:
        overrides["structure"] = str(RUNS / match_run)
    elif match_run:
        overrides["target_macs"] = landed_macs_fraction(match_run)
    if target_latency is not None:
        overrides.update({"hiap.cost": "latency", "hiap.target_latency": float(target_latency)})
    if gate_forward:
        overrides["hiap.gate_forward"] = gate_forward
    if sweep_ratio:
        overrides.update(sweep_overrides(params, sweep_ratio))
    if method == "two_phase":
        overrides["optim.epochs"] = post_freeze_epochs(params)
    if method != "dense":
        fraction = overrides.get("target_macs") or target_latency
        if method in TRANSPLANTS:
            fraction = landed_macs_fraction(match_run)
        picked = lr_warmup or recipe(params, method, fraction)
        epochs = overrides.get("optim.epochs", params[STAGE_GROUPS[method]]["epochs"])
        overrides.update({"optim.lr": float(picked["lr"]), "optim.warmup_epochs": float(picked["warmup"]) * epochs})
    return overrides
