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

from tqdm import tqdm  # console bars: tqdm.auto warns in kernels without ipywidgets

from ..core.cost import count_macs
from ..core.extract import extract
from ..core.files import atomic_write
from ..core.gated_vit import gate_vit, set_gate_state
from ..core.inference import optimize_for_inference
from ..core.models import cifar_vit_tiny
from ..core.pruned import PrunedAttention, PrunedViT, set_padded_attention
from ..core.pruner import param_groups
from ..core.timing import alternate, models_ms
from ..train.config import cli, config_from_params, load_params
from ..train.data import build_loaders
from ..train.models import build_dense_model
from ..train.objective import step_loss
from ..train.pruning import make_pruner
from ..train.paths import PARAMS, REPORTS
from .states import empty_state, extracted_models
from ..core.timing import machine


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


def best_efficiency(macs_fraction: float, static_fraction: float, floor_share: float) -> float:
    """The speedup / MACs-ratio a model at `macs_fraction` of dense MACs reaches if its prunable time falls
    exactly with its prunable MACs: `floor_share` of dense time (at `static_fraction` of its MACs) stays."""
    prunable = (macs_fraction - static_fraction) / (1 - static_fraction)
    return macs_fraction / (floor_share + (1 - floor_share) * prunable)


def executed_macs(model: PrunedViT) -> int:
    """MACs `model` executes per image in its attention layout: `count_macs` (its own MACs) plus, in the padded
    layout, the products with the zero columns V is padded with."""
    tokens = model.spec.num_patches + model.spec.num_prefix_tokens
    padding = sum(
        m.num_heads * m.padded_width - m.v_dim
        for m in model.modules()
        if isinstance(m, PrunedAttention) and m.pad_values and not m.values_as_wide_as_qk
    )
    return count_macs(model) + tokens * tokens * padding


def inference_models(fractions: list[float]) -> tuple[nn.Module, PrunedViT, dict[float, PrunedViT]]:
    """The CIFAR ViT-Tiny (timm, random weights), its floor (every head and FFN removed: the time no pruning
    takes away) and one model extracted at each MACs fraction (random feasible gate states)."""
    dense, pruned = extracted_models(cifar_vit_tiny, fractions)
    empty = gate_vit(copy.deepcopy(dense)).eval()
    set_gate_state(empty, empty_state(empty))
    return dense, extract(empty), pruned


def target_efficiency(batch: int) -> float:
    """The issue's CPU targets for speedup / MACs-ratio (2 threads): 0.92 at batch 64, 0.85 at batch 1."""
    return 0.92 if batch > 1 else 0.85


def _efficiencies(prefix: str, ms: dict, macs: dict, fraction: float, batch: int) -> dict:
    """Speedup, its ratio to the MACs ratio and the best ratio the floor allows, for `prefix` ('' eager,
    'optimized_'): `ms` holds dense, pruned and floor times under that prefix."""
    speedup, mac_ratio = ms[f"{prefix}dense"] / ms[f"{prefix}pruned_{fraction}"], macs["dense"] / macs[fraction]
    floor_share = ms[f"{prefix}floor"] / ms[f"{prefix}dense"]
    best = best_efficiency(macs[fraction] / macs["dense"], macs["floor"] / macs["dense"], floor_share)
    target = target_efficiency(batch)
    return {
        f"{prefix}dense_ms": ms[f"{prefix}dense"],
        f"{prefix}pruned_ms": ms[f"{prefix}pruned_{fraction}"],
        f"{prefix}floor_ms": ms[f"{prefix}floor"],
        f"{prefix}floor_time_share": floor_share,
        f"{prefix}speedup": speedup,
        f"{prefix}speedup_over_mac_ratio": speedup / mac_ratio,
        f"{prefix}best_speedup_over_mac_ratio": best,
        f"{prefix}meets_target": speedup / mac_ratio >= target or speedup / mac_ratio >= best - 0.02,
    }


def bench_inference(fractions: list[float], batches: dict[int, int], optimize: bool = True) -> list[dict]:
    """Extracted (per-head and padded attention) vs dense and the floor, eager and, with `optimize`, each
    through `optimize_for_inference` (dense and floor too: a fair comparison optimizes both), all timed
    alternately in one loop per batch. Targets: speedup / MACs-ratio >= 0.92 at batch 64, >= 0.85 at
    batch 1, or within 0.02 of the best the floor allows."""
    dense, floor, pruned = inference_models(fractions)
    macs = {"dense": count_macs(dense), "floor": count_macs(floor), **{f: count_macs(m) for f, m in pruned.items()}}
    rows = []
    for batch, runs in batches.items():
        x = torch.randn(batch, 3, 32, 32)
        models = {"dense": dense, "floor": floor}
        for fraction, model in pruned.items():
            models[f"pruned_{fraction}"], models[f"padded_{fraction}"] = model, copy.deepcopy(model)
            set_padded_attention(models[f"padded_{fraction}"], True)
        if optimize:
            eager = [name for name in models if not name.startswith("padded")]
            optimized = {name: optimize_for_inference(models[name], x) for name in tqdm(eager, desc="compiling", disable=None)}
            models.update({f"optimized_{name}": m for name, m in optimized.items()})
        ms = models_ms(models, x, runs, warmup=5)
        for fraction in fractions:
            row = {"macs_cut": 1 - macs[fraction] / macs["dense"], "dense_macs": macs["dense"], "pruned_macs": macs[fraction]}
            row.update(
                batch=batch, runs=runs, mac_ratio=macs["dense"] / macs[fraction], floor_macs_share=macs["floor"] / macs["dense"]
            )
            row.update(_efficiencies("", ms, macs, fraction, batch))
            padded = models[f"padded_{fraction}"]
            row.update(
                padded_ms=ms[f"padded_{fraction}"],
                padded_speedup_over_mac_ratio=ms["dense"] / ms[f"padded_{fraction}"] / row["mac_ratio"],
                padded_executed_macs_over_pruned_macs=executed_macs(padded) / macs[fraction],
            )
            if optimize:
                row.update(_efficiencies("optimized_", ms, macs, fraction, batch))
                chosen = optimized[f"pruned_{fraction}"]
                row.update(optimized_layout=chosen.attention_layout, optimized_max_abs_diff=chosen.max_abs_diff)
                row.update(optimized_over_eager_dense=ms["dense"] / ms["optimized_dense"])
                row.update(optimized_over_eager_pruned=row["pruned_ms"] / row["optimized_pruned_ms"])
            row["target_speedup_over_mac_ratio_min"] = target_efficiency(batch)
            rows.append(row)
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
            "inference": bench_inference(
                settings["macs_fractions"], {1: settings["batch1_runs"], 64: settings["batch64_runs"]}, settings["optimize"]
            ),
        }
    if "train" in suites:
        results["train"] = {"machine": machine(), **bench_train_loop(args.params, settings["train_rounds"])}
    for name, result in results.items():
        atomic_write(args.out_dir / f"{name}.json", lambda p, r=result: p.write_text(json.dumps(r, indent=2)))
        print(json.dumps(result, indent=2))
    return results


if __name__ == "__main__":
    sys.exit(cli(main))
