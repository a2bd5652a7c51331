"""The validated run configuration: one dataclass per `params.yaml` group. Every invalid value is
reported as one line naming the field, before any data is read."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from ..core.errors import first_line
from ..core.gated_vit import GATE_FORWARDS

# finetune: the teacher, KD fine-tuned, unpruned; transplant: a HiAP run's units on the teacher's weights, fine-tuned
# as a baseline (its full steps); two_phase: the same, fine-tuned for HiAP's post-freeze steps only (HiAP's compute)
CUT_METHODS = ("uniform", "uniform_heads", "l1_ffn", "torch_pruning", "torch_pruning_heads")  # baselines cut to target_macs
FLOOR_METHODS = ("uniform", "torch_pruning_heads", "torch_pruning", "l1_ffn")  # their cost floors: baselines.reach
METHODS = ("dense", "hiap", *CUT_METHODS, "finetune", "transplant", "two_phase")
TRANSPLANTS = ("transplant", "two_phase")  # the methods that train a HiAP run's units (`structure`)
COSTS = ("macs", "latency")
DATASETS = ("fashion_mnist", "cifar10", "imagenet")
IMAGES = {"fashion_mnist": (1, 28), "cifar10": (3, 32), "imagenet": (3, None)}  # (channels, side; None: resized)
AUGMENTATIONS = ("crop_flip", "flip", "none")  # data.augment of the in-memory datasets (ImageNet: timm/DeiT's)
AMP_MODES = ("auto", "bf16", "fp16", "off")  # optim.amp; auto: bf16 autocast on a CUDA GPU with bf16, else fp32
GATE_LR_SCHEDULES = ("cosine", "constant")  # optim.gate_lr_schedule


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field."""


# The dataclass defaults are params.yaml's values (`data`, `model`, the `dense` stage's optimiser and the `hiap`
# group; tests/test_train.py keeps them equal): a params file that leaves a key out trains as the study does.


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"
    root: str | None = None  # None: the dataset's default places (Debian's package for Fashion-MNIST)
    download: bool = True  # fetch official files when absent and the network allows
    checksum: str | None = None  # CIFAR-10 archive md5 override (None: the official archive)
    val_size: int = 5000  # training images held out (stratified, fixed) for every recipe choice; 0: none
    train_subset: int | None = None  # deterministic random subset sizes of the rest (quick profiles)
    test_subset: int | None = None
    augment: str = "flip"  # crop_flip | flip | none (a shifted crop moves content across patch borders)
    workers: int = 4  # ImageNet loader processes


@dataclass
class ModelConfig:
    name: str = "custom"  # "custom": a timm VisionTransformer from the fields below; else a timm model name
    img_size: int = 28
    patch_size: int = 7
    in_chans: int = 1
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    num_classes: int = 10
    drop_path: float = 0.0
    pretrained: str | None = None  # checkpoint file for the dense weights/teacher, or "hub" (needs network)


@dataclass
class OptimConfig:
    epochs: int = 12
    batch_size: int = 128
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    grad_clip: float = 1.0  # 0: off
    gate_lr: float = 0.1  # learning rate of the gate logits (HiAP; the `hiap` group's)
    gate_lr_schedule: str = "cosine"  # the gates' rate over the search: cosine (the weights' decay, no warmup) | constant
    macro_gate_lr_scale: float = 1.0  # the macro gates' (heads, FFN blocks) rate as a multiple of gate_lr
    amp: str = "auto"  # autocast of the forward passes: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | off
    compile: bool = False  # torch.compile the training network (the first steps pay for the compilation)


@dataclass
class HiAPConfig:
    lambda_macro: float = 0.1
    lambda_micro: float = 0.05
    lambda_feas: float = 10.0
    lambda_polarise: float = 0.0  # weight of the polarising term sum w p(1 - p) / sum w, from budget_deadline on
    tau0: float = 2.0
    tau_min: float = 0.5
    init_logit: float = 3.0
    min_heads: float = 1.0
    min_value_fraction: float = 0.125
    min_neuron_fraction: float = 0.125
    kd_alpha: float = 0.5
    kd_temperature: float = 1.0
    cost: str = "macs"  # what the penalties (and a budget) measure: macs | latency (needs cost_table)
    cost_table: str | None = "reports/tables/cost_table.json"  # per-unit latency table (hiap_core.measure.cost_table)
    target_latency: float | None = None  # budget-exact mode for cost latency: fraction of dense latency
    budget_lr: float = 0.1  # budget-exact mode: integral step on log(penalty scale) per unit of overshoot
    budget_gain: float = 2.0  # ... proportional: log(penalty scale) offset per unit of the current overshoot
    budget_deadline: float = 0.7  # ... the projected structure should be on target by this fraction of the search
    budget_velocity_steps: int = 1  # ... the projection's velocity: the logits' mean step over this many last steps
    budget_tolerance: float = 0.005  # ... final hardened cost further than this (relative): round the least sure gates
    search_fraction: float = 0.5  # the gates search this fraction of the steps, then freeze (1: to the end)
    gate_forward: str = "hard"  # hard: 0/1 sample, straight-through gradient; soft: the relaxed sample


@dataclass
class RunConfig:
    method: str = "dense"
    out: str = "runs/dense"
    seed: int = 0
    teacher: str | None = None  # folder written by the dense run (its `model/`), for hiap and baselines
    teacher_logits: str | None = None  # the teacher's cached logits (hiap_core.train.teacher_logits); None: run it live
    target_macs: float | None = None  # fraction of dense MACs (<= 1) or MACs (> 1): baselines cut to it; HiAP
    # with it set runs in budget-exact mode (lambda ratio kept, scale adapted); None: plain lambda mode
    structure: str | None = None  # transplant: the HiAP run folder whose kept units (its closing.csv) it trains
    progress: bool = True  # tqdm bars (off on non-zero ranks and when CI is set)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    hiap: HiAPConfig = field(default_factory=HiAPConfig)

    def validate(self) -> RunConfig:
        _validate(self)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def budget_exact(self) -> bool:
        return self.method == "hiap" and (self.target_macs is not None or self.hiap.target_latency is not None)


def _fail(name: str, value, rule: str):
    raise ConfigError(f"invalid config: {name} = {value!r}: {rule}")


def _check_types(obj, prefix: str) -> None:
    """Refuse a value of the wrong type, naming the field; a number written as text (YAML 1.1 reads `1e-3` as a
    string) or an integral float for an int field is stored as the number it is."""
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_types(value, f"{name}.")
            continue
        kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
        allowed = tuple(k for part in str(f.type).replace(" ", "").split("|") for k in kinds.get(part, ()))
        optional = "None" in str(f.type)
        if value is None:
            if not optional:
                _fail(name, value, "must be set")
            continue
        value = _as_number(value, allowed)
        setattr(obj, f.name, value)
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            _fail(name, value, f"must be of type {f.type}")
        if isinstance(value, float) and not math.isfinite(value):
            _fail(name, value, "must be finite")


def _as_number(value, allowed: tuple[type, ...]):
    """`value` as the number it spells for a numeric field (text `float()` parses, an integral float for an
    int field); anything else unchanged, for the type check to refuse."""
    if int not in allowed or isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if float not in allowed and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _data_rules(cfg: RunConfig) -> list[tuple[str, bool, str]]:
    """(field, holds, rule) for the `data` group (a validation split larger than the training set is refused
    where the set's size is known, `data.validation_split`)."""
    return [
        ("data.dataset", cfg.data.dataset in DATASETS, f"must be one of {', '.join(DATASETS)}"),
        ("data.augment", cfg.data.augment in AUGMENTATIONS, f"must be one of {', '.join(AUGMENTATIONS)}"),
        ("data.train_subset", cfg.data.train_subset is None or cfg.data.train_subset >= 1, "must be >= 1 or null"),
        ("data.test_subset", cfg.data.test_subset is None or cfg.data.test_subset >= 1, "must be >= 1 or null"),
        ("data.val_size", cfg.data.val_size >= 0, "must be >= 0 (0: no validation split)"),
        ("data.workers", cfg.data.workers >= 0, "must be >= 0"),
    ]


def _range_rules(cfg: RunConfig) -> list[tuple[str, bool, str]]:
    """(field, holds, rule) for the value ranges of every group."""
    return [
        ("method", cfg.method in METHODS, f"must be one of {', '.join(METHODS)}"),
        *_model_rules(cfg),
        *_optim_hiap_rules(cfg),
    ]


def _model_rules(cfg: RunConfig) -> list[tuple[str, bool, str]]:
    return [
        ("model.img_size", cfg.model.img_size >= 1, "must be >= 1"),
        (
            "model.patch_size",
            cfg.model.patch_size >= 1 and (cfg.model.name != "custom" or cfg.model.img_size % cfg.model.patch_size == 0),
            "must divide model.img_size (a named timm model brings its own patch size)",
        ),
        ("model.in_chans", cfg.model.in_chans >= 1, "must be >= 1"),
        ("model.embed_dim", cfg.model.embed_dim >= 1, "must be >= 1"),
        (
            "model.in_chans",
            cfg.model.in_chans == IMAGES.get(cfg.data.dataset, (cfg.model.in_chans,))[0],
            "must match the dataset's channels",
        ),
        (
            "model.img_size",
            IMAGES.get(cfg.data.dataset, (0, None))[1] in (None, cfg.model.img_size),
            "must match the dataset's image size",
        ),
        (
            "model.num_heads",
            cfg.model.num_heads >= 1 and cfg.model.embed_dim % cfg.model.num_heads == 0,
            "must divide model.embed_dim",
        ),
        ("model.depth", cfg.model.depth >= 1, "must be >= 1"),
        ("model.mlp_ratio", cfg.model.mlp_ratio > 0, "must be > 0"),
        ("model.num_classes", cfg.model.num_classes >= 2, "must be >= 2"),
        ("model.drop_path", 0 <= cfg.model.drop_path < 1, "must be in [0, 1)"),
    ]


def _optim_hiap_rules(cfg: RunConfig) -> list[tuple[str, bool, str]]:
    return [
        ("optim.epochs", cfg.optim.epochs >= 1, "must be >= 1"),
        ("optim.batch_size", cfg.optim.batch_size >= 1, "must be >= 1"),
        ("optim.lr", cfg.optim.lr > 0, "must be > 0"),
        ("optim.min_lr", 0 <= cfg.optim.min_lr <= cfg.optim.lr, "must be in [0, optim.lr]"),
        ("optim.warmup_epochs", 0 <= cfg.optim.warmup_epochs <= cfg.optim.epochs, "must be in [0, optim.epochs]"),
        ("optim.weight_decay", cfg.optim.weight_decay >= 0, "must be >= 0"),
        ("optim.label_smoothing", 0 <= cfg.optim.label_smoothing < 1, "must be in [0, 1)"),
        ("optim.grad_clip", cfg.optim.grad_clip >= 0, "must be >= 0 (0 disables clipping)"),
        ("optim.gate_lr", cfg.optim.gate_lr > 0, "must be > 0"),
        ("optim.macro_gate_lr_scale", cfg.optim.macro_gate_lr_scale > 0, "must be > 0 (1: the macro gates at gate_lr)"),
        (
            "optim.gate_lr_schedule",
            cfg.optim.gate_lr_schedule in GATE_LR_SCHEDULES,
            f"must be one of {', '.join(GATE_LR_SCHEDULES)}",
        ),
        ("optim.amp", cfg.optim.amp in AMP_MODES, f"must be one of {', '.join(AMP_MODES)}"),
        ("seed", 0 <= cfg.seed < 2**31, "must be in [0, 2**31)"),
        ("hiap.init_logit", cfg.hiap.init_logit > 0, "must be > 0: every gate starts open (a negative one closes every unit)"),
        ("hiap.lambda_macro", cfg.hiap.lambda_macro >= 0, "must be >= 0"),
        ("hiap.lambda_micro", cfg.hiap.lambda_micro >= 0, "must be >= 0"),
        ("hiap.lambda_feas", cfg.hiap.lambda_feas >= 0, "must be >= 0"),
        ("hiap.lambda_polarise", cfg.hiap.lambda_polarise >= 0, "must be >= 0 (0: off, as in the paper)"),
        ("hiap.tau0", cfg.hiap.tau0 > 0, "must be > 0"),
        ("hiap.tau_min", 0 < cfg.hiap.tau_min <= cfg.hiap.tau0, "must be in (0, hiap.tau0]"),
        ("hiap.min_heads", 0 <= cfg.hiap.min_heads <= cfg.model.num_heads, "must be in [0, model.num_heads]"),
        ("hiap.min_value_fraction", 0 <= cfg.hiap.min_value_fraction <= 1, "must be in [0, 1]"),
        ("hiap.min_neuron_fraction", 0 <= cfg.hiap.min_neuron_fraction <= 1, "must be in [0, 1]"),
        ("hiap.kd_alpha", 0 <= cfg.hiap.kd_alpha <= 1, "must be in [0, 1]"),
        ("hiap.kd_temperature", cfg.hiap.kd_temperature > 0, "must be > 0"),
        ("hiap.cost", cfg.hiap.cost in COSTS, f"must be one of {', '.join(COSTS)}"),
        ("hiap.search_fraction", 0 < cfg.hiap.search_fraction <= 1, "must be in (0, 1]: the share of training the gates search"),
        ("hiap.gate_forward", cfg.hiap.gate_forward in GATE_FORWARDS, f"must be one of {', '.join(GATE_FORWARDS)}"),
    ]


def _cost_rules(cfg: RunConfig) -> list[tuple[str, bool, str]]:
    """(field, holds, rule) for the cost model and budget-exact mode, whose fields depend on each other."""
    return [
        (
            "hiap.cost_table",
            cfg.hiap.cost != "latency" or cfg.hiap.cost_table is not None,
            "hiap.cost = latency needs a cost table: measure one with `python -m hiap_core.measure.cost_table --out FILE`",
        ),
        (
            "hiap.target_latency",
            cfg.hiap.target_latency is None or 0 < cfg.hiap.target_latency <= 1,
            "must be a fraction of dense latency in (0, 1] or null",
        ),
        (
            "hiap.target_latency",
            cfg.hiap.target_latency is None or cfg.hiap.cost == "latency",
            "needs hiap.cost = latency (with hiap.cost = macs set target_macs)",
        ),
        (
            "target_macs",
            cfg.target_macs is None or cfg.method != "hiap" or cfg.hiap.cost == "macs",
            "is a MACs budget: with hiap.cost = latency set hiap.target_latency instead",
        ),
        (
            "target_macs",
            cfg.target_macs is None or cfg.target_macs > 0,
            "must be > 0: a fraction of dense MACs (<= 1) or MACs (> 1)",
        ),
        ("hiap.budget_lr", cfg.hiap.budget_lr > 0, "must be > 0"),
        ("hiap.budget_gain", cfg.hiap.budget_gain >= 0, "must be >= 0"),
        ("hiap.budget_deadline", 0 < cfg.hiap.budget_deadline <= 1, "must be in (0, 1]: a fraction of the search"),
        ("hiap.budget_velocity_steps", cfg.hiap.budget_velocity_steps >= 1, "must be >= 1 (1: the last step's velocity)"),
        ("hiap.budget_tolerance", 0 < cfg.hiap.budget_tolerance <= 0.05, "must be in (0, 0.05]"),
    ]


def _validate(cfg: RunConfig) -> None:
    if cfg.optim.amp is False:  # YAML 1.1 reads a bare `off` (params.yaml, --set optim.amp=off) as false
        cfg.optim.amp = "off"
    _check_types(cfg, "")
    for name, ok, rule in _data_rules(cfg) + _range_rules(cfg) + _cost_rules(cfg):
        if not ok:
            _fail(name, _get(cfg, name), rule)
    if cfg.method in CUT_METHODS:
        if cfg.target_macs is None or not 0 < cfg.target_macs < 1:
            _fail("target_macs", cfg.target_macs, f"must be in (0, 1) for method {cfg.method}")
    if cfg.method in ("dense", "finetune", *TRANSPLANTS) and cfg.target_macs is not None:
        _fail("target_macs", cfg.target_macs, f"is the budget of hiap and the cut baselines; {cfg.method} has none: unset it")
    if cfg.method == "dense" and cfg.teacher_logits is not None:
        _fail("teacher_logits", cfg.teacher_logits, "the dense teacher distils from nobody: leave it null")
    if (cfg.method in TRANSPLANTS) != (cfg.structure is not None):
        _fail("structure", cfg.structure, "a HiAP run folder for methods transplant and two_phase, and only for them")
    if cfg.method != "dense" and cfg.teacher is None and cfg.model.pretrained is None:
        _fail("teacher", None, f"method {cfg.method} needs the dense run's folder (teacher) or model.pretrained")
    if cfg.model.name != "custom" and cfg.model.name not in _timm_models():
        _fail("model.name", cfg.model.name, "is not a timm model name (or 'custom')")
    if cfg.model.name != "custom" and (problem := _not_gateable(cfg.model)):
        _fail("model.name", cfg.model.name, problem)


@functools.cache
def _timm_models() -> set[str]:
    from ..core import torchvision_compat  # noqa: F401
    import timm

    return set(timm.list_models())


def _not_gateable(m) -> str | None:
    """Why the timm model `m.name` cannot be pruned here (None when it can): built on the meta device (no
    memory, no weights), so a ResNet or a Swin is refused before any data or checkpoint is read."""
    import torch
    import timm

    from ..core.describe import describe

    try:
        with torch.device("meta"):
            model = timm.create_model(
                m.name, pretrained=False, num_classes=m.num_classes, img_size=m.img_size, in_chans=m.in_chans
            )
        describe(model)  # checks it (check_vit) and its sizes (an image size its patches do not tile)
    except Exception as err:  # a ResNet takes no img_size (TypeError); other models assert on their own sizes
        return (
            f"cannot be pruned by hiap_core with this model config ({first_line(err)}): "
            "it takes timm VisionTransformers whose patches tile model.img_size"
        )
    return None


def _get(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


STAGE_GROUPS = {  # the params.yaml group each method's optimiser settings come from
    "dense": "dense",
    "hiap": "hiap",
    **dict.fromkeys(CUT_METHODS, "baselines"),
    "finetune": "baselines",
    "transplant": "baselines",
    "two_phase": "baselines",
}
SECTIONS = ("data", "model", "optim", "hiap")
KD_KEYS = ("kd_alpha", "kd_temperature")  # the `hiap` settings every distilled run reads, not only HiAP's
GATE_OPTIM_FIELDS = ("optim.gate_lr", "optim.gate_lr_schedule", "optim.macro_gate_lr_scale")  # read by HiAP alone


def read_by(method: str, field: str) -> bool:
    """Whether a run of `method` reads config `field` (`hiap.lambda_macro`): only HiAP reads the gate settings
    (`hiap.*` but the KD ones, `optim.gate_lr`, its schedule and its macro scale); dense and the baselines train no gates."""
    if method == "hiap":
        return True
    section, _, name = field.partition(".")
    return field not in GATE_OPTIM_FIELDS and (section != "hiap" or name in KD_KEYS)


_STAGE_DATA_KEYS = ("train_subset", "augment")  # a stage may train on a subset of the shared data
_RUN_KEYS = ("seed", "teacher", "teacher_logits", "target_macs", "progress", "out")
_STAGE_KEYS = (*_names(OptimConfig), *_names(HiAPConfig), *_STAGE_DATA_KEYS, *_RUN_KEYS)


def _leaves(*names: str) -> dict:
    """Schema of a mapping whose keys hold plain values (checked where they are used)."""
    return dict.fromkeys(names)


# Every key params.yaml may hold: a dict is a mapping with these keys ("*": any name), None a value.
PARAMS_SCHEMA = {
    "data": _leaves(*_names(DataConfig)),
    "model": _leaves(*_names(ModelConfig)),
    "dense": _leaves(*_STAGE_KEYS),
    "hiap": _leaves(*_STAGE_KEYS),
    "baselines": _leaves(*_STAGE_KEYS, "methods", "reach"),
    "seeds": None,
    "comparisons": _leaves("primary", "alpha", "detect", "power"),
    "schedule": _leaves("budgets", "epochs", "methods"),
    "budgets": {"*": _leaves("target_macs")},
    "recipe_grid": _leaves("lr", "warmup", "budgets", "seed"),
    "recipes": {"*": None},
    "ablation": _leaves("budget", "gate_forward"),
    "latency_target": _leaves("target"),
    "cost_table": _leaves("batch_size", "threads", "fit_models", "eval_models", "runs", "seed"),
    "sweep": {
        **_leaves("target_macs", "epochs", "train_subset"),
        "ratios": {"*": _leaves("lambda_macro", "lambda_micro", "target_macs")},
    },
    "gate_evolution": _leaves("run", "compare_with"),
    "latency": _leaves("batch1_runs", "batch64_runs", "versus_runs", "threads", "optimize"),
    "bench": _leaves("threads", "train_batch", "train_rounds", "batch1_runs", "batch64_runs", "macs_fractions", "optimize"),
    "imagenet": {
        **_leaves("enabled", "nproc_per_node"),
        "data": _leaves(*_names(DataConfig)),
        "model": _leaves(*_names(ModelConfig)),
        "hiap": _leaves(*_STAGE_KEYS),
    },
}


def _did_you_mean(key, names, prefix: str = "") -> str:
    close = difflib.get_close_matches(str(key), [n for n in names if n != "*"], n=1)
    return f": did you mean {prefix}{close[0]}?" if close else f" (valid: {', '.join(sorted(names))})"


def check_params(params, schema: dict = PARAMS_SCHEMA, prefix: str = "") -> None:
    """Refuse a params key the schema does not know, naming the closest valid one, and a group that is not a
    mapping: a typo must not leave a setting at its default without a word."""
    if not isinstance(params, dict):
        where = prefix.rstrip(".") or "the params file"
        raise ConfigError(f"invalid params: {where} must be a mapping of names to values, got {params!r}")
    for key, value in params.items():
        if key not in schema and "*" not in schema:
            raise ConfigError(f"invalid params: unknown key {prefix}{key}{_did_you_mean(key, schema, prefix)}")
        inner = schema.get(key, schema.get("*"))
        if inner is not None and value is not None:
            check_params(value, inner, f"{prefix}{key}.")
    if not prefix:
        for name, check, rule in _study_rules(params):
            try:
                ok = check()
            except (TypeError, KeyError, AttributeError):
                ok = False
            if not ok:
                raise ConfigError(f"invalid params: {name}: {rule}")


def _number_list(value, low: float, high: float) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v < high for v in value)
    )


def _recipe_picks_ok(picks) -> bool:
    """A `recipes` entry: a non-empty list of {macs, lr, warmup} in their ranges (and `borrowed`: the method
    whose pick it copies, where the grid has not tuned this one there)."""
    return bool(picks) and all(
        set(p) - {"borrowed"} == {"macs", "lr", "warmup"}
        and _number_list([p["lr"]], 1e-12, float("inf"))
        and _number_list([p["warmup"]], 0.0, 1.0)
        and _number_list([p["macs"]], 1e-9, 1.0 + 1e-9)
        for p in picks
    )


def _method_rules(params: dict, names: set, linked: bool) -> list[tuple[str, Callable[[], bool], str]]:
    """`baselines.reach` (every method with a cost floor, each with budgets of `budgets`), the declared primary
    family (`comparisons.primary`: methods HiAP is compared with) and the schedule study's methods and budgets."""
    base, comparisons, schedule = (params.get(key) or {} for key in ("baselines", "comparisons", "schedule"))
    rules = []
    if "reach" in base:
        rules.append(
            (
                "baselines.reach",
                lambda: (
                    set(base["reach"]) == set(FLOOR_METHODS)
                    and all(isinstance(b, list) and (not linked or set(b) <= names) for b in base["reach"].values())
                ),
                f"must give every method with a cost floor ({', '.join(FLOOR_METHODS)}) a list of budgets of `budgets`",
            )
        )
    if "primary" in comparisons:
        rules.append(
            (
                "comparisons.primary",
                lambda: bool(comparisons["primary"]) and set(comparisons["primary"]) <= {*CUT_METHODS, *TRANSPLANTS},
                f"must list methods HiAP is compared with (of {', '.join((*CUT_METHODS, *TRANSPLANTS))})",
            )
        )
    if "methods" in schedule:
        rules.append(
            (
                "schedule.methods",
                lambda: (
                    set(schedule["methods"]) <= {*CUT_METHODS, *TRANSPLANTS} and (not linked or set(schedule["budgets"]) <= names)
                ),
                "must list baselines (and schedule.budgets budgets of `budgets`)",
            )
        )
    return rules


def _study_rules(params: dict) -> list[tuple[str, Callable[[], bool], str]]:
    """(key, check, rule) for the study's groups that cross-reference each other, where present: a pipeline
    built on an empty or dangling one would fail inside a stage, after the upstream stages ran. A check
    that cannot even read its value (a list where a mapping belongs) fails."""
    budgets, seeds = params.get("budgets"), params.get("seeds")
    names = set(budgets) if isinstance(budgets, dict) else set()
    linked = "budgets" in params  # a partial params dict (a notebook's groups) has nothing to cross-reference
    known = f"must name budgets of `budgets` ({', '.join(sorted(names))})"
    grid = params.get("recipe_grid") or {}
    ablation = params.get("ablation") or {}

    def distinct_seeds() -> bool:
        return (
            bool(seeds)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in seeds)
            and len(set(seeds)) == len(seeds)
        )

    rules = []
    if "seeds" in params:
        rules.append(("seeds", distinct_seeds, "must be a non-empty list of distinct integers >= 0"))
    if "budgets" in params:
        rules.append(
            (
                "budgets",
                lambda: bool(budgets) and _number_list([b["target_macs"] for b in budgets.values()], 1e-9, 1.0),
                "must name at least one budget, each with target_macs in (0, 1)",
            )
        )
    if grid:
        rules += [
            (
                "recipe_grid.lr",
                lambda: _number_list(grid["lr"], 1e-12, float("inf")),
                "must be a non-empty list of learning rates > 0",
            ),
            ("recipe_grid.warmup", lambda: _number_list([grid["warmup"]], 0.0, 1.0), "must be a fraction of the steps in [0, 1)"),
            ("recipe_grid.budgets", lambda: bool(grid["budgets"]) and (not linked or set(grid["budgets"]) <= names), known),
        ]
    if "budget" in ablation and linked:
        rules.append(("ablation.budget", lambda: ablation["budget"] in names, known))
    rules += _method_rules(params, names, linked)
    for method, picks in (params.get("recipes") or {}).items():
        rules.append(
            (
                f"recipes.{method}",
                lambda picks=picks: _recipe_picks_ok(picks),
                "must be a list of {macs, lr, warmup[, borrowed]}: macs in (0, 1], lr > 0, warmup in [0, 1)",
            )
        )
    return rules


def _stage_field(key: str) -> str:
    """The config field a stage group's `key` sets (`epochs` -> `optim.epochs`)."""
    for section, cls in (("optim", OptimConfig), ("hiap", HiAPConfig)):
        if key in _names(cls):
            return f"{section}.{key}"
    return f"data.{key}" if key in _STAGE_DATA_KEYS else key


def _resolve(cfg: RunConfig, key: str) -> tuple[object, str]:
    """The dataclass and field that `key` sets. A params.yaml stage group (`dense.epochs`) stands for the
    field its key maps onto, when it is the run's own stage."""
    section, _, name = key.rpartition(".")
    if section in STAGE_GROUPS.values() and not (section == "hiap" and name in _names(HiAPConfig)):
        stage = STAGE_GROUPS.get(cfg.method)
        if name not in _STAGE_KEYS:
            raise ConfigError(f"invalid config: unknown field {key!r}{_did_you_mean(name, _STAGE_KEYS, f'{section}.')}")
        if section != stage:
            raise ConfigError(
                f"invalid config: {key!r} belongs to the {section} stage; method {cfg.method} reads the {stage} "
                f"group: set {_stage_field(name)}"
            )
        section, _, name = _stage_field(name).rpartition(".")
    if section and section not in SECTIONS:
        raise ConfigError(f"invalid config: unknown section {key!r}{_did_you_mean(section, SECTIONS)}")
    target = getattr(cfg, section) if section else cfg
    fields = [n for n in _names(type(target)) if not dataclasses.is_dataclass(getattr(target, n))]
    if name not in fields:
        raise ConfigError(f"invalid config: unknown field {key!r}{_did_you_mean(name, fields, section + '.' if section else '')}")
    return target, name


def apply_overrides(cfg: RunConfig, overrides: list[str] | dict) -> RunConfig:
    """Apply `section.field=value` overrides (text values parsed as YAML); unknown fields are errors."""
    if isinstance(overrides, dict):
        items = overrides.items()
    else:
        items = []
        for text in overrides:
            key, sep, value = text.partition("=")
            if not sep:
                raise ConfigError(f"invalid override {text!r}: expected field=value")
            items.append((key, _parse_value(key, value)))
    for key, value in items:
        target, name = _resolve(cfg, key)
        setattr(target, name, value)
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """`yaml.safe_load` that refuses a key given twice in one mapping, as DVC does (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first_line[key]}): keep one", key_node.start_mark
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _safe_load(text: str):
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)


def _parse_value(key: str, text: str):
    try:
        return _safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid override {key}={text!r}: not a YAML value ({str(err).splitlines()[0]})") from err


def cli(main: Callable[[], object]) -> int:
    """Run a command's `main`; a bad params file or value is one `error:` line and exit status 2, not a traceback."""
    try:
        main()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def load_params(path: str | Path) -> dict:
    """params.yaml as a dict; a missing file, malformed YAML or a non-mapping is one line naming the place."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found")
    try:
        params = _safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"params file {where}: malformed YAML: {problem}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"params file {path}: cannot be read ({err})") from err
    if params is None:  # an empty or truncated file would otherwise train every default without a word
        raise ConfigError(f"params file {path} is empty: it needs the groups (data, model, ...) of the project's params.yaml")
    if not isinstance(params, dict):
        raise ConfigError(f"params file {path} must be a mapping of groups (data, model, ...), got {type(params).__name__}")
    return params


def config_from_params(params: dict | str | Path, method: str, overrides: dict | list | None = None) -> RunConfig:
    """Build a run config from `params.yaml`: shared `data`, `model`, `hiap` groups, and the optimiser
    settings (and optionally `train_subset` / `augment`) of the stage group named after the method
    (`dense`, `hiap`, `baselines`). Every key is checked against `PARAMS_SCHEMA` first."""
    params = params if isinstance(params, dict) else load_params(params)
    check_params(params)
    stage = STAGE_GROUPS.get(method)
    if stage is None:
        raise ConfigError(f"invalid config: method = {method!r}: must be one of {', '.join(METHODS)}")
    cfg = RunConfig(method=method)
    flat = {}
    for section in ("data", "model"):
        flat.update({f"{section}.{k}": v for k, v in (params.get(section) or {}).items()})
    flat.update({_stage_field(k): v for k, v in (params.get(stage) or {}).items() if k not in ("methods", "reach")})
    if stage != "hiap":  # KD settings are shared by every distilled run
        flat.update({f"hiap.{k}": v for k, v in (params.get("hiap") or {}).items() if k in KD_KEYS})
    apply_overrides(cfg, flat)
    if overrides:
        apply_overrides(cfg, overrides)
        keys = overrides if isinstance(overrides, dict) else [text.partition("=")[0] for text in overrides]
        unread = [key for key in keys if not read_by(method, key)]
        if unread:  # params.yaml's shared groups hold them for every method; a run's own setting must count
            raise ConfigError(
                f"invalid config: {', '.join(unread)} set on a {method} run, which trains no gates and never reads "
                "them: drop them, or train method hiap"
            )
    return cfg.validate()
