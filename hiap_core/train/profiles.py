"""Named parameter profiles: `python -m hiap_core.train.profiles NAME [--params params.yaml]` merges a
profile into params.yaml; then `dvc repro` (or `make repro`) runs the study with it.

- `paper`: the paper's CIFAR-10 ViT-Tiny study (img 32, patch 4, 200 epochs): for a machine with a GPU.
- `smoke`: the whole pipeline on tiny subsets in a few minutes (the end-to-end test uses it).
"""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

from ..core.files import atomic_write
from .paths import PARAMS


class Replace(dict):
    """A profile group that replaces the params.yaml group whole (its keys not kept), where merging would keep
    the default's other entries (budgets, sweep ratios)."""


PROFILES = {
    "paper": {
        "data": {"dataset": "cifar10", "root": None, "train_subset": None, "test_subset": None},
        "model": {
            "img_size": 32,
            "patch_size": 4,
            "in_chans": 3,
            "embed_dim": 192,
            "depth": 6,
            "num_heads": 3,
            "mlp_ratio": 4.0,
            "num_classes": 10,
        },
        # fp32 (TF32): on an H100 bf16 autocast slows this small model's steps (reports/benchmarks/gpu.json:
        # batch 128, dense 7.4k vs 10.6k img/s, HiAP 2.2k vs 2.7k); its casts only add kernels to a launch-bound step
        "dense": {"epochs": 200, "warmup_epochs": 5, "amp": "off"},
        # the paper's runs settle within the first 10 epochs; fine-tunes on all 50k images (not the default's subset)
        "hiap": {"epochs": 200, "search_fraction": 0.05, "train_subset": None, "amp": "off"},
        "baselines": {"epochs": 200, "train_subset": None, "amp": "off"},
        "sweep": {"epochs": 50, "train_subset": None},
    },
    "smoke": {
        "data": {"val_size": 256, "train_subset": 256, "test_subset": 128},
        "model": {"embed_dim": 48, "num_heads": 3, "depth": 2, "mlp_ratio": 4.0},
        "dense": {"epochs": 1, "warmup_epochs": 0.5, "batch_size": 64},
        "hiap": {"epochs": 2, "batch_size": 64, "gate_lr": 0.5, "init_logit": 1.0, "train_subset": 256},
        "seeds": [0, 1],
        # a mild and a harsh budget (uniform's floor on this 48-wide model is 0.23 of MACs): every stage kind, fewer stages
        "budgets": Replace({"moderate": {"target_macs": 0.67}, "harsh": {"target_macs": 0.3}}),
        # Torch-Pruning's steps on this 48-wide model are about 1% of MACs, too coarse to land within 0.5% of
        # every HiAP run: tests/test_torch_pruning.py covers it; the default study runs it.
        # each stage kind once at least, each stage ~11 s (papermill, imports): the two-phase transplant in the budgets x seeds
        # matrix, and a cut baseline (uniform, the one gate_evolution draws beside HiAP) as the floor stage
        "baselines": {
            "epochs": 2,
            "batch_size": 64,
            "train_subset": 256,
            "methods": ["two_phase"],
            "reach": Replace({"uniform": ["harsh"], "torch_pruning_heads": [], "torch_pruning": [], "l1_ffn": []}),
        },
        "schedule": {"budgets": ["harsh"], "epochs": [2, 3]},  # the smoke study has no `steep` budget
        # the grid's procedure on one rate at one budget (its Run All in tests/test_pipeline.py trains every cell)
        "recipe_grid": {"lr": [2.0e-4], "budgets": ["harsh"]},
        "sweep": {
            "epochs": 1,
            "train_subset": 128,
            "ratios": Replace(
                {
                    "r2_1": {"lambda_macro": 0.3, "lambda_micro": 0.15},
                    "macro_only": {"lambda_macro": 0.45, "lambda_micro": 0.0, "target_macs": 0.85},
                }
            ),
        },
        # compiling every study model at each batch would double the smoke run: tests/test_latency.py covers it
        "latency": {"batch1_runs": 3, "batch64_runs": 2, "versus_runs": 2, "optimize": False},
        "cost_table": {"fit_models": 8, "eval_models": 3, "runs": 2},
        "latency_target": {"target": 1.0},  # any lower target may fall below a tiny model's measured floor
        # compiling is tested in tests/test_inference.py and tests/test_latency.py: 8 compiles here cost CI minutes
        "bench": {
            "train_batch": 16,
            "train_rounds": 1,
            "batch1_runs": 3,
            "batch64_runs": 2,
            "macs_fractions": [0.5],
            "optimize": False,
        },
    },
}


def merge(base, override: dict):
    """Deep-merge `override` into `base` in place (keeps ruamel's comments on untouched keys)."""
    for key, value in override.items():
        if isinstance(value, Replace):
            base[key] = dict(value)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


PROFILE_MARK = "# profile: {} (hiap_core.train.profiles); a profile applies to the default params.yaml\n"


def applied_profile(text: str) -> str | None:
    """The profile a params file was rewritten with (its first line's mark), None for the default."""
    match = re.match(r"# profile: (\S+) \(hiap_core.train.profiles\)", text)
    return match.group(1) if match else None


def apply(name: str, params: Path = PARAMS) -> dict:
    """Merge profile `name` into the params file and mark it so. A file that has another profile is refused: its
    groups that `name` leaves alone (seeds, budgets, methods) would silently stay the other profile's."""
    from ruamel.yaml import YAML  # here: `PROFILES` is read on bare GPU machines too (measure/gpu_bench.py)

    if name not in PROFILES:
        raise SystemExit(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)}")
    text = params.read_text()
    current = applied_profile(text)
    if current not in (None, name):
        raise SystemExit(
            f"{params} has the {current!r} profile: a profile applies to the default params, or {current!r}'s seeds, "
            f"budgets and methods would stay; restore the default (`git checkout {params}`), then apply {name!r}"
        )
    yaml = YAML()  # round-trip: the comments of params.yaml survive
    merged = merge(yaml.load(text), PROFILES[name])
    body = io.StringIO()
    yaml.dump(merged, body)
    atomic_write(params, lambda p: p.write_text(("" if current else PROFILE_MARK.format(name)) + body.getvalue()))
    return merged


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(PROFILES))
    parser.add_argument("--params", type=Path, default=PARAMS)
    args = parser.parse_args(argv)
    apply(args.name, args.params)
    print(f"{args.params}: profile {args.name!r} applied; run `dvc repro` (or `make repro`)")


if __name__ == "__main__":
    main()
