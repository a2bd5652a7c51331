"""Benchmarks (`make bench`, `python -m hiap_core.measure.bench`).

`core`: gated vs dense training step and extracted vs dense inference (CIFAR ViT-Tiny) ->
`reports/benchmarks/core.json`. `train`: images/s of the loader alone and of dense and HiAP training
steps on the default params.yaml model and data -> `reports/benchmarks/train.json`.

Timings alternate between the compared models inside one run,
so machine noise hits both alike; ratios are what to read, not absolute times.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..core.cost import count_macs
from ..core.extract import extract
from ..core.files import atomic_write
from ..core.gated_vit import gate_vit, gated_blocks, set_gate_state
from ..core.models import cifar_vit_tiny
from ..core.pruner import param_groups
from ..train.config import cli, config_from_params, load_params
from ..train.data import build_loaders
from ..train.engine import build_dense_model, make_pruner, step_loss
from ..train.paths import PARAMS, REPORTS
from .states import random_feasible_state
from .timing import alternate, machine


def bench_training(batch: int, rounds: int) -> dict:
    torch.manual_seed(0)
    dense = cifar_vit_tiny().train()
    gated = gate_vit(copy.deepcopy(dense)).train()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step_fn(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        return step

    times = alternate({"dense": step_fn(dense), "gated": step_fn(gated)}, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": "cifar_vit_tiny",
        "batch": batch,
        "rounds": rounds,
        "dense_step_s": med["dense"],
        "gated_step_s": med["gated"],
        "ratio_gated_over_dense": med["gated"] / med["dense"],
        "target_ratio_max": 1.10,
    }


def empty_state(gated: nn.Module) -> list[dict]:
    """Every head and FFN removed: what remains (patch embedding, LayerNorms of nothing, residual adds of
    biases, the head) is the time no pruning can take away."""
    return [{"heads": torch.zeros(a.num_heads, dtype=torch.bool), "ffn": torch.tensor(False)} for a, _ in gated_blocks(gated)]


def best_efficiency(macs_fraction: float, static_fraction: float, floor_share: float) -> float:
    """The speedup / MACs-ratio a model at `macs_fraction` of dense MACs reaches if its prunable time falls
    exactly with its prunable MACs: `floor_share` of dense time (at `static_fraction` of its MACs) stays."""
    prunable = (macs_fraction - static_fraction) / (1 - static_fraction)
    return macs_fraction / (floor_share + (1 - floor_share) * prunable)


def bench_inference(macs_fractions: list[float], batches: dict[int, int]) -> list[dict]:
    """Extracted vs dense at each MACs fraction and batch, alternating; beside each efficiency, the best one
    reachable at that fraction given the time share of the model with nothing prunable left (the floor)."""
    torch.manual_seed(0)
    dense = cifar_vit_tiny().eval()
    dense_macs = count_macs(dense)
    empty = gate_vit(copy.deepcopy(dense)).eval()
    set_gate_state(empty, empty_state(empty))
    floor, static_fraction = extract(empty), count_macs(empty) / dense_macs
    rows = []
    for fraction in macs_fractions:
        gated = gate_vit(copy.deepcopy(dense)).eval()
        set_gate_state(gated, random_feasible_state(gated, fraction))
        pruned = extract(gated)
        pruned_macs = count_macs(pruned)
        for batch, runs in batches.items():
            x = torch.randn(batch, 3, 32, 32)
            with torch.inference_mode():
                timed = {"dense": lambda: dense(x), "pruned": lambda: pruned(x), "floor": lambda: floor(x)}
                times = alternate(timed, runs, warmup=5)
            med = {k: statistics.median(v) for k, v in times.items()}
            speedup, mac_ratio = med["dense"] / med["pruned"], dense_macs / pruned_macs
            floor_share = med["floor"] / med["dense"]
            rows.append(
                {
                    "macs_cut": 1 - pruned_macs / dense_macs,
                    "dense_macs": dense_macs,
                    "pruned_macs": pruned_macs,
                    "batch": batch,
                    "runs": runs,
                    "dense_ms": 1e3 * med["dense"],
                    "pruned_ms": 1e3 * med["pruned"],
                    "floor_ms": 1e3 * med["floor"],
                    "floor_time_share": floor_share,
                    "floor_macs_share": static_fraction,
                    "speedup": speedup,
                    "mac_ratio": mac_ratio,
                    "speedup_over_mac_ratio": speedup / mac_ratio,
                    "best_speedup_over_mac_ratio": best_efficiency(pruned_macs / dense_macs, static_fraction, floor_share),
                    "target_speedup_over_mac_ratio_min": 0.92 if batch > 1 else 0.85,
                }
            )
    return rows


def training_step(model, cfg, x, y, teacher=None, pruner=None, amp_dtype=None):
    """One full training step of a study run on the batch (x, y), as the engine takes it (forwards under
    autocast to `amp_dtype`; the loss read back to the host, a synchronisation, as the engine logs it)."""
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.gate_lr))
    step_index = iter(range(10**9))

    def step() -> float:
        index = next(step_index)
        if pruner is not None:
            pruner.set_step(index)
        opt.zero_grad(set_to_none=True)
        loss = step_loss(model, x, y, cfg, teacher, pruner, amp_dtype)["loss"]
        loss.backward()
        opt.step()
        if pruner is not None:
            pruner.after_step(index)
        return float(loss.detach())

    return step


def bench_train_loop(params: Path, rounds: int) -> dict:
    """Loader alone (one full epoch) vs the training steps of the default study model, each with everything
    a run does: dense (cross-entropy), KD (a baseline's fine-tune: plus the teacher forward) and HiAP (plus
    penalties, feasibility, budget control); and the evaluation forward. Where a study run's time goes."""
    dense_cfg = config_from_params(params, "dense", {"progress": False})
    hiap_cfg = config_from_params(params, "hiap", {"progress": False, "teacher": "unused"})
    train_loader = build_loaders(dense_cfg.data, dense_cfg.model.img_size, dense_cfg.optim.batch_size, 0).train
    start = time.perf_counter()
    images = sum(len(y) for _, y in train_loader)
    loader_images_per_s = images / (time.perf_counter() - start)

    torch.manual_seed(0)
    dense = build_dense_model(dense_cfg).train()
    teacher = copy.deepcopy(dense).eval()
    gated = copy.deepcopy(dense)
    pruner = make_pruner(hiap_cfg, gated, total_steps=rounds + 2)
    gated.train()
    x, y = next(iter(train_loader))

    student, evaluated = copy.deepcopy(dense), copy.deepcopy(dense).eval()

    def evaluate():
        with torch.inference_mode():
            evaluated(x)

    steps = {
        "dense": training_step(dense, dense_cfg, x, y),
        "kd": training_step(student, hiap_cfg, x, y, teacher),
        "hiap": training_step(gated, hiap_cfg, x, y, teacher, pruner),
        "eval": evaluate,
    }
    times = alternate(steps, rounds)
    per_s = {k: len(y) / statistics.median(v) for k, v in times.items()}
    m = dense_cfg.model
    return {
        "dataset": dense_cfg.data.dataset,
        "model": f"{m.name} D={m.embed_dim} depth={m.depth} patch={m.patch_size}",
        "batch": len(y),
        "train_images": images,
        "loader_images_per_s": loader_images_per_s,
        "dense_step_images_per_s": per_s["dense"],
        "kd_step_images_per_s": per_s["kd"],
        "hiap_step_images_per_s": per_s["hiap"],
        "eval_images_per_s": per_s["eval"],
        "loader_over_hiap_step_speed": loader_images_per_s / per_s["hiap"],
        "dense_epoch_s": images / per_s["dense"],
        "hiap_epoch_s": images / per_s["hiap"],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", help="core and/or train (default: both)")
    parser.add_argument("--out-dir", type=Path, default=REPORTS / "benchmarks")
    parser.add_argument("--params", type=Path, default=PARAMS)
    args = parser.parse_args(argv)
    suites = args.suites or ["core", "train"]
    if set(suites) - {"core", "train"}:
        parser.error(f"unknown suites {sorted(set(suites) - {'core', 'train'})}: choose core and/or train")
    settings = load_params(args.params)["bench"]
    torch.set_num_threads(settings["threads"])
    results = {}
    if "core" in suites:
        results["core"] = {
            "machine": machine(),
            "training_step": bench_training(settings["train_batch"], settings["train_rounds"]),
            "inference": bench_inference([0.67, 0.50], {1: settings["batch1_runs"], 64: settings["batch64_runs"]}),
        }
    if "train" in suites:
        results["train"] = {"machine": machine(), **bench_train_loop(args.params, settings["train_rounds"])}
    for name, result in results.items():
        atomic_write(args.out_dir / f"{name}.json", lambda p, r=result: p.write_text(json.dumps(r, indent=2)))
        print(json.dumps(result, indent=2))
    return results


if __name__ == "__main__":
    sys.exit(cli(main))
