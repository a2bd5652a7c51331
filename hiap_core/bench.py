"""Benchmarks (`make bench`). `core`: gated vs dense training step and extracted vs dense inference
(CIFAR ViT-Tiny) -> `reports/benchmarks/core.json`. `train`: images/s of the loader alone and of dense
and HiAP training steps on the default params.yaml model and data -> `reports/benchmarks/train.json`.

Timings alternate between the compared models inside one run,
so machine noise hits both alike; ratios are what to read, not absolute times.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from . import torchvision_compat  # noqa: F401  (before timm)
from .arch import describe
from .cost import count_macs
from .extract import extract
from .files import atomic_write
from .gated_vit import gate_vit, gated_blocks, set_gate_state


def cifar_vit_tiny(num_classes: int = 10) -> nn.Module:
    """The paper's CIFAR-10 ViT-Tiny: img 32, patch 4, embed 192, depth 6, 3 heads, mlp 768."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0, num_classes=num_classes)


def random_feasible_state(gated: nn.Module, macs_fraction: float, seed: int = 0) -> list[dict]:
    """A random gate state whose hard MACs are `macs_fraction` of dense (within 0.5%), keeping at least one
    head with one value dim per layer. One uniform draw per unit; a unit is kept iff its draw < r, and
    r is bisected, so states are nested and MACs are monotone in r."""
    gen = torch.Generator().manual_seed(seed)
    blocks = gated_blocks(gated)
    draws = [
        {
            "heads": torch.rand(a.num_heads, generator=gen),
            "values": torch.rand(a.num_heads, a.head_dim, generator=gen),
            "ffn": torch.rand((), generator=gen),
            "neurons": torch.rand(m.fc1.out_features, generator=gen),
        }
        for a, m in blocks
    ]
    first_head = [int(d["heads"].argmin()) for d in draws]

    def state(r: float) -> list[dict]:
        out = []
        for d, h0 in zip(draws, first_head):
            heads = d["heads"] < r
            heads[h0] = True
            values = d["values"] < r
            values[h0, d["values"][h0].argmin()] = True
            out.append({"heads": heads, "values": values, "ffn": d["ffn"] < 0.5 + r / 2, "neurons": d["neurons"] < r})
        return out

    dense = count_macs(describe(gated).dense())
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        set_gate_state(gated, state(mid))
        lo, hi = (mid, hi) if count_macs(gated) / dense < macs_fraction else (lo, mid)
    set_gate_state(gated, state(hi))
    got = count_macs(gated) / dense
    if abs(got - macs_fraction) > 0.005:
        raise ValueError(f"could not reach {macs_fraction:.3f} of dense MACs with this model (got {got:.4f})")
    return state(hi)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(fns: dict, rounds: int, warmup: int = 2, progress: bool = False) -> dict[str, list[float]]:
    """Run each callable once per round, in turn, and return its wall times (seconds)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in tqdm(range(rounds), desc="timing rounds", disable=not progress, leave=False):
        for name, fn in fns.items():
            times[name].append(_time(fn))
    return times


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


def bench_inference(macs_fractions: list[float], batches: dict[int, int]) -> list[dict]:
    torch.manual_seed(0)
    dense = cifar_vit_tiny().eval()
    dense_macs = count_macs(dense)
    rows = []
    for fraction in macs_fractions:
        gated = gate_vit(copy.deepcopy(dense)).eval()
        set_gate_state(gated, random_feasible_state(gated, fraction))
        pruned = extract(gated)
        pruned_macs = count_macs(pruned)
        for batch, runs in batches.items():
            x = torch.randn(batch, 3, 32, 32)
            with torch.inference_mode():
                times = alternate({"dense": lambda: dense(x), "pruned": lambda: pruned(x)}, runs, warmup=5)
            med = {k: statistics.median(v) for k, v in times.items()}
            speedup = med["dense"] / med["pruned"]
            rows.append(
                {
                    "macs_cut": 1 - pruned_macs / dense_macs,
                    "dense_macs": dense_macs,
                    "pruned_macs": pruned_macs,
                    "batch": batch,
                    "runs": runs,
                    "dense_ms": 1e3 * med["dense"],
                    "pruned_ms": 1e3 * med["pruned"],
                    "speedup": speedup,
                    "mac_ratio": dense_macs / pruned_macs,
                    "speedup_over_mac_ratio": speedup / (dense_macs / pruned_macs),
                    "target_speedup_over_mac_ratio_min": 0.95 if batch > 1 else 0.85,
                }
            )
    return rows


def bench_train_loop(params: Path, rounds: int) -> dict:
    """Loader alone (one full epoch) vs dense and HiAP training steps of the default study model."""
    from .config import config_from_params
    from .data import build_loaders
    from .train import Trainer, build_dense_model, param_groups

    dense_cfg = config_from_params(params, "dense", {"progress": False})
    hiap_cfg = config_from_params(params, "hiap", {"progress": False, "teacher": "unused"})
    train_loader, _, _ = build_loaders(dense_cfg.data, dense_cfg.model.img_size, dense_cfg.optim.batch_size, 0)
    start = time.perf_counter()
    images = sum(len(y) for _, y in train_loader)
    loader_images_per_s = images / (time.perf_counter() - start)

    torch.manual_seed(0)
    dense = build_dense_model(dense_cfg).train()
    teacher = copy.deepcopy(dense).eval()
    gated = gate_vit(copy.deepcopy(dense)).train()
    x, y = next(iter(train_loader))

    def step_fn(model, cfg, teacher_model):
        trainer = Trainer(cfg)
        if cfg.method == "hiap":
            trainer.prepare_costs(model)
        opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr)

        def step():
            opt.zero_grad(set_to_none=True)
            trainer._loss(model, model, teacher_model, x, y)["loss"].backward()
            opt.step()

        return step

    times = alternate({"dense": step_fn(dense, dense_cfg, None), "hiap": step_fn(gated, hiap_cfg, teacher)}, rounds)
    per_s = {k: len(y) / statistics.median(v) for k, v in times.items()}
    return {
        "dataset": dense_cfg.data.dataset,
        "model": f"{dense_cfg.model.name} D={dense_cfg.model.embed_dim} depth={dense_cfg.model.depth} patch={dense_cfg.model.patch_size}",
        "batch": len(y),
        "train_images": images,
        "loader_images_per_s": loader_images_per_s,
        "dense_step_images_per_s": per_s["dense"],
        "hiap_step_images_per_s": per_s["hiap"],
        "loader_over_hiap_step_speed": loader_images_per_s / per_s["hiap"],
        "dense_epoch_s": images / per_s["dense"],
        "hiap_epoch_s": images / per_s["hiap"],
    }


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")] if cpuinfo.exists() else []
    cpu = names[0] if names else platform.processor()
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", help="core and/or train (default: both)")
    parser.add_argument("--out-dir", type=Path, default=Path("reports/benchmarks"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    suites = args.suites or ["core", "train"]
    if set(suites) - {"core", "train"}:
        parser.error(f"unknown suites {sorted(set(suites) - {'core', 'train'})}: choose core and/or train")
    settings = yaml.safe_load(args.params.read_text())["bench"]
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
    main()
