"""GPU benchmark (`make bench-gpu`, `python -m hiap_core.measure.gpu_bench`) -> `reports/benchmarks/gpu.json`.

- Training steps, images/s, fp32 (TF32 matmuls) and bf16 autocast, as the engine takes them: dense
  (cross-entropy), KD (a baseline's or the control's fine-tune: plus the teacher forward), HiAP while its
  gates search (plus the gates, penalties and budget control) and once they are frozen, for the CIFAR
  ViT-Tiny at batch 128 and 512 and DeiT-S at 256 (halved until it fits), with the evaluation forward and
  the in-memory loader (synthetic CIFAR-shaped images, crop and flip, pinned, copied to the device).
- Inference, images/s, bf16 weights and inputs: models extracted at 67% and 50% of dense MACs (random
  feasible gate states) vs dense, ViT-Tiny and DeiT-S at batch 1, 64 and 256, eager (per-head and padded
  attention) and through `optimize_for_inference` (CUDA graphs), dense optimized too.
- `onnx`: the same models on the CPU, fp32, PyTorch beside ONNX Runtime (skipped where onnxruntime is
  not installed); `study`: the study's extracted HiAP models vs its dense one at batch 1 (data/runs, where
  present), beside the paper's 1.44x.
- The wall time of the `paper` profile estimated from the training figures (the formula is in the JSON).

It imports only torch, timm, pandas, safetensors, tqdm (and PyYAML, which timm requires), so it runs on a
bare GPU machine without dvc or papermill; the `onnx` part also needs onnxruntime and onnxscript.
`--parts` picks what to measure; `--tiny`: a small ViT at small batches (the CPU test).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm  # console bars: tqdm.auto warns in kernels without ipywidgets

from ..core.cost import count_macs
from ..core.extract import extract
from ..core.files import atomic_write
from ..core.gated_vit import gate_vit
from ..core.inference import optimize_for_inference
from ..core.models import cifar_vit_tiny
from ..core.pruned import load_pruned, set_padded_attention
from ..core.pruner import Pruner
from ..core.timing import synchronize
from ..train.config import RunConfig, cli, config_from_params, load_params
from ..train.data import CROP_PADDING, NORMALIZATION, ArrayDataset, TensorLoader
from ..train.device import autocast, use_tensor_cores
from ..train.paths import PARAMS, REPORTS, RUNS
from ..train.profiles import PROFILES, merge
from ..train.runs import post_freeze_epochs, sweep_overrides
from .bench import training_step
from .states import extracted_models

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
CIFAR_TRAIN_IMAGES, CIFAR_TEST_IMAGES = 50_000, 10_000
HIAP_TARGET = 0.5  # the study's HiAP runs are budget-exact: the controller's per-step work is timed too
INFERENCE_FRACTIONS = (0.67, 0.50)  # extracted at 33% and 50% MACs cuts
PAPER_BATCH1_SPEEDUP = 1.44  # the paper's DeiT-S extracted at 33% fewer MACs, batch 1
PARTS = ("training", "inference", "onnx", "study")
ONNX_BATCHES = (1, 64)  # ONNX Runtime on the CPU: those of a workload's inference batches up to its largest


def _deit_small() -> torch.nn.Module:
    import timm

    return timm.create_model("deit_small_patch16_224", pretrained=False)


def _tiny_vit() -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=10)


# name: (builder, image side, training batches, inference batches)
WORKLOADS = {
    "cifar_vit_tiny": (cifar_vit_tiny, 32, (128, 512), (1, 64, 256)),
    "deit_small_patch16_224": (_deit_small, 224, (256,), (1, 64, 256)),
}
TINY_WORKLOADS = {"tiny_vit": (_tiny_vit, 16, (4, 8), (2,))}
TINY_FRACTIONS = (0.5,)  # each extracted model compiles at each batch: the CPU test keeps to one


def images_per_s(fn, batch: int, device: torch.device, seconds: float, warmup: int = 3, max_iters: int = 200) -> float:
    """Images per second of `fn` (one batch per call) after `warmup` calls: as many calls as fit in about
    `seconds` (3 to `max_iters`), timed between two device synchronisations."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    synchronize(device)
    per_call = (time.perf_counter() - start) / warmup
    iters = min(max_iters, max(3, int(seconds / max(per_call, 1e-9))))
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return batch * iters / (time.perf_counter() - start)


def _training_rates(build, side: int, batch: int, device: torch.device, dtype, seconds: float) -> dict:
    """Images/s at one batch and precision of the steps a study run takes (dense: cross-entropy; KD: a
    baseline's or the control's fine-tune; HiAP while its gates search and once they are frozen) and of
    the evaluation forward."""
    torch.manual_seed(0)
    dense = build().to(device).train()
    teacher = copy.deepcopy(dense).eval()
    searching, frozen = copy.deepcopy(dense), copy.deepcopy(dense)
    search = Pruner(searching, total_steps=10**6, target=HIAP_TARGET)  # the search phase: the dearest steps
    # the search ends after one step: the second (a warmup call) rounds to the target and freezes the gates
    after_search = Pruner(frozen, total_steps=10**6, target=HIAP_TARGET, search_fraction=1e-6)
    x = torch.randn(batch, 3, side, side, device=device)
    y = torch.randint(0, dense.num_classes, (batch,), device=device)
    cfg = RunConfig(method="hiap")
    steps = {
        "dense": training_step(dense, cfg, x, y, amp_dtype=dtype),
        "kd": training_step(copy.deepcopy(teacher).train(), cfg, x, y, teacher, amp_dtype=dtype),
        "hiap": training_step(searching.train(), cfg, x, y, teacher, search, dtype),
        "hiap_frozen": training_step(frozen.train(), cfg, x, y, teacher, after_search, dtype),
    }
    rates = {f"{name}_step_images_per_s": images_per_s(step, batch, device, seconds) for name, step in steps.items()}
    assert after_search.frozen and not search.frozen  # each step measured the phase it names

    def evaluate():
        with torch.inference_mode(), autocast(dtype, device):
            teacher(x)

    rates["eval_images_per_s"] = images_per_s(evaluate, batch, device, seconds)
    return rates


def _largest_fitting(build, side: int, batch: int, device: torch.device, dtype, seconds: float) -> tuple[int, dict]:
    """(batch, `_training_rates`) at `batch`, halved until it fits in the GPU's memory."""
    while True:
        try:
            return batch, _training_rates(build, side, batch, device, dtype, seconds)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        torch.cuda.empty_cache()  # outside the except block: the failed attempt's tensors are freed by now
        batch //= 2


def bench_training(workloads: dict, device: torch.device, seconds: float) -> list[dict]:
    """`_training_rates` for every workload, training batch and precision (the row keeps the requested batch
    when a smaller one had to be taken)."""
    rows = []
    for name, (build, side, batches, _) in workloads.items():
        for requested in batches:
            for precision, dtype in PRECISIONS.items():
                batch, rates = _largest_fitting(build, side, requested, device, dtype, seconds)
                rows.append({"model": name, "precision": precision, "requested_batch": requested, "batch": batch, **rates})
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the next workload may need all of it
    return rows


def _forward(model, x):
    def run():
        with torch.inference_mode():
            model(x)

    return run


def bench_inference(workloads: dict, device: torch.device, seconds: float, fractions=INFERENCE_FRACTIONS) -> list[dict]:
    """Images/s in bf16 (weights and inputs) of models extracted at each MACs fraction vs dense, eager in both
    attention layouts and through `optimize_for_inference` (dense too: a fair comparison optimizes both)."""
    rows = []
    for name, (build, side, _, batches) in workloads.items():
        dense, pruned = extracted_models(build, fractions)
        macs = {"dense": count_macs(dense), **{f: count_macs(m) for f, m in pruned.items()}}
        dense = dense.to(device, torch.bfloat16)
        for batch in tqdm(batches, desc=f"{name} inference", disable=None):
            x = torch.randn(batch, 3, side, side, device=device, dtype=torch.bfloat16)
            optimized_dense = optimize_for_inference(dense, x)
            dense_rates = [images_per_s(_forward(m, x), batch, device, seconds, max_iters=1000) for m in (dense, optimized_dense)]
            for fraction, model in pruned.items():
                model = model.to(device, torch.bfloat16)
                padded = copy.deepcopy(model)
                set_padded_attention(padded, True)
                try:
                    optimized = optimize_for_inference(model, x)
                except RuntimeError as err:  # one model outside the tolerance: say so in its row, measure the rest
                    rows.append(
                        {"model": name, "batch": batch, "macs_fraction": macs[fraction] / macs["dense"], "error": str(err)}
                    )
                    continue
                rates = [images_per_s(_forward(m, x), batch, device, seconds, max_iters=1000) for m in (model, padded, optimized)]
                rows.append(
                    {
                        "model": name,
                        "precision": "bf16",
                        "batch": batch,
                        "macs_fraction": macs[fraction] / macs["dense"],
                        "dense_images_per_s": dense_rates[0],
                        "extracted_images_per_s": rates[0],
                        "padded_images_per_s": rates[1],
                        "optimized_dense_images_per_s": dense_rates[1],
                        "optimized_extracted_images_per_s": rates[2],
                        "speedup": rates[0] / dense_rates[0],
                        "padded_speedup": rates[1] / dense_rates[0],
                        "optimized_speedup": rates[2] / dense_rates[1],
                        "optimized_layout": optimized.attention_layout,
                        "optimized_max_abs_diff": optimized.max_abs_diff,
                    }
                )
    return rows


def bench_onnx_cpu(workloads: dict, seconds: float, fractions=INFERENCE_FRACTIONS, batches=ONNX_BATCHES) -> list[dict]:
    """Images/s on the CPU, fp32, of dense and extracted models in PyTorch (eager) and ONNX Runtime (each
    export checked against PyTorch): the deployment runtime beside the framework."""
    import tempfile

    from ..core.export import INPUT, onnx_runtime

    cpu, rows = torch.device("cpu"), []
    for name, (build, side, _, inference_batches) in workloads.items():
        if not inference_batches:
            continue
        dense, pruned = extracted_models(build, fractions)
        dense = extract(gate_vit(dense).eval())  # the same model as a PrunedViT, which the ONNX export takes
        with tempfile.TemporaryDirectory() as tmp:
            sessions = {key: onnx_runtime(m, Path(tmp) / f"{key}.onnx")[0] for key, m in [("dense", dense), *pruned.items()]}
        for batch in [b for b in batches if b <= max(inference_batches, default=0)]:
            x = torch.randn(batch, 3, side, side)
            feed = {INPUT: x.numpy()}
            for key, model in [("dense", dense), *pruned.items()]:
                session = sessions[key]
                rows.append(
                    {
                        "model": name,
                        "precision": "fp32",
                        "batch": batch,
                        "macs_fraction": 1.0 if key == "dense" else count_macs(model) / count_macs(dense),
                        "pytorch_images_per_s": images_per_s(_forward(model, x), batch, cpu, seconds),
                        "onnxruntime_images_per_s": images_per_s(lambda s=session: s.run(None, feed), batch, cpu, seconds),
                    }
                )
    return rows


def study_model_folders() -> list[Path]:
    """The study's extracted HiAP models, where they and the dense model are on this machine."""
    return sorted(RUNS.glob("hiap_*_s*/model")) if (RUNS / "dense" / "model").is_dir() else []


def bench_study_models(device: torch.device, seconds: float, batch: int = 1) -> list[dict]:
    """The study's extracted HiAP models (data/runs/hiap_*/model, where present) vs its dense model at
    batch 1, bf16, eager and optimized: beside the paper's 1.44x at batch 1 for its 33% MACs cut."""
    folders = study_model_folders()
    if not folders:
        return []
    dense = load_pruned(RUNS / "dense" / "model").to(device, torch.bfloat16)
    x = torch.randn(batch, dense.spec.in_chans, *dense.spec.img_size, device=device, dtype=torch.bfloat16)
    optimized_dense = optimize_for_inference(dense, x)
    rows = []
    for folder in tqdm(folders, desc="study models", disable=None):
        model = load_pruned(folder).to(device, torch.bfloat16)
        optimized = optimize_for_inference(model, x)
        rates = [
            images_per_s(_forward(m, x), batch, device, seconds, max_iters=1000)
            for m in (dense, model, optimized_dense, optimized)
        ]
        rows.append(
            {
                "run": folder.parent.name,
                "batch": batch,
                "macs_fraction": count_macs(model) / count_macs(dense),
                "speedup": rates[1] / rates[0],
                "optimized_speedup": rates[3] / rates[2],
                "paper_batch1_speedup_at_33pct_cut": PAPER_BATCH1_SPEEDUP,
            }
        )
    return rows


def loader_images_per_s(batch: int, device: torch.device, seconds: float, images: int = 4096) -> float:
    """The in-memory loader of CIFAR-10 (synthetic images of its shape): crop and flip, normalise, pin on
    CUDA, copy to the device. Its batches are made between the training steps, so its time adds to theirs."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    data = ArrayDataset(pixels, torch.zeros(images, dtype=torch.int64), 10)
    mean, std = NORMALIZATION["cifar10"]
    cuda = device.type == "cuda"
    loader = TensorLoader(data, batch, mean, std, True, augment="crop_flip", padding=CROP_PADDING["cifar10"], pin_memory=cuda)
    batches = iter(())

    def next_batch():
        nonlocal batches
        x, y = next(batches, (None, None))
        if x is None:
            batches = iter(loader)
            x, y = next(batches)
        x.to(device, non_blocking=cuda), y.to(device, non_blocking=cuda)

    return images_per_s(next_batch, batch, device, seconds, max_iters=10**6)


def paper_runs(params: dict) -> dict:
    """The training runs of the study under `params`: {group: {runs, epochs, train_images, batch_size, steps}},
    each read from the run config its stage builds; `steps` is the share of its steps of each kind."""
    seeds, budgets = len(params["seeds"]), len(params["budgets"])
    ratios = params["sweep"]["ratios"]

    def shape(count: int, method: str, overrides: dict | None = None) -> dict:
        teacher = {} if method == "dense" else {"teacher": str(RUNS / "dense")}  # named, not read
        cfg = config_from_params(params, method, {**teacher, **(overrides or {})})
        search = cfg.hiap.search_fraction
        steps = {"hiap": search, "hiap_frozen": 1 - search} if method == "hiap" else {"dense" if method == "dense" else "kd": 1.0}
        images, batch = cfg.data.train_subset or CIFAR_TRAIN_IMAGES, cfg.optim.batch_size
        return {"runs": count, "epochs": cfg.optim.epochs, "train_images": images, "batch_size": batch, "steps": steps}

    baselines = params["baselines"]
    full_length = [m for m in baselines["methods"] if m != "two_phase"]
    runs = {
        "dense": shape(1, "dense"),
        # Table 3's HiAP runs, the gate-forward ablation (every seed) and the latency-targeted run
        "hiap": shape(budgets * seeds + seeds + 1, "hiap"),
        # every full-length baseline at every budget and seed, the floor methods at theirs, and the unpruned
        # fine-tuning control
        "baselines": shape(
            (len(full_length) * budgets + sum(len(b) for b in baselines["reach"].values())) * seeds + seeds,
            "finetune",
        ),
        "sweep": shape(len(ratios), "hiap", sweep_overrides(params, next(iter(ratios)))),
    }
    if "two_phase" in baselines["methods"]:  # HiAP's post-freeze epochs only
        runs["two_phase"] = shape(budgets * seeds, "finetune", {"optim.epochs": post_freeze_epochs(params)})
    return runs


ESTIMATE_FORMULA = (
    "hours = sum over runs of epochs * (train_images * (sum over its steps of share / step + 1 / loader) + "
    "test_images / eval) / 3600, with the images/s of the benchmarked CIFAR model at the batch nearest the run's "
    "batch_size: the teacher's steps are dense_step, a baseline's and the control's kd_step, a HiAP or sweep run's "
    "hiap_step while its gates search (hiap.search_fraction of its steps) and hiap_frozen_step after; loader at "
    "that batch; eval = the evaluation forward. Not counted: process start, reading CIFAR-10, extraction, the "
    "notebooks and the CPU stages (cost_table, latency, bench)."
)


def paper_profile_estimate(training: list[dict], loader_rates: dict[int, float], model: str) -> dict:
    """The wall time of `dvc repro` under the `paper` profile, from the measured images/s (`ESTIMATE_FORMULA`)."""
    params = merge(load_params(PARAMS), copy.deepcopy(PROFILES["paper"]))
    test_images = params["data"].get("test_subset") or CIFAR_TEST_IMAGES
    runs = paper_runs(params)
    hours = {}
    for precision in PRECISIONS:
        rows = [r for r in training if r["model"] == model and r["precision"] == precision]
        per_group = {}
        for name, run in runs.items():
            row = min(rows, key=lambda r: abs(r["batch"] - run["batch_size"]))
            per_image = sum(share / row[f"{step}_step_images_per_s"] for step, share in run["steps"].items())
            per_image += 1 / loader_rates[row["batch"]]
            epoch = run["train_images"] * per_image + test_images / row["eval_images_per_s"]
            per_group[name] = run["runs"] * run["epochs"] * epoch / 3600
        hours[precision] = {"total": sum(per_group.values()), **per_group}
    return {
        "profile": "paper",
        "model": model,
        "formula": ESTIMATE_FORMULA,
        "test_images": test_images,
        "runs": runs,
        "hours": hours,
    }


def _device_info(device: torch.device) -> dict:
    from ..core.timing import machine

    info = {"type": device.type, **machine()}
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda, tf32=True)
    else:
        info.update(name=info["cpu"])
    return info


def _measure_count(workloads: dict, fractions: tuple[float, ...], parts: tuple[str, ...], estimate_model: str) -> int:
    """How many figures `run` times (each for about the same number of seconds)."""
    count = 0
    for _, _, training_batches, inference_batches in workloads.values():
        if "training" in parts:
            count += 5 * len(PRECISIONS) * len(training_batches)  # 4 steps + eval
        if "inference" in parts:
            count += len(inference_batches) * (2 + 3 * len(fractions))
        if "onnx" in parts:
            count += 2 * len([b for b in ONNX_BATCHES if b <= max(inference_batches, default=0)]) * (1 + len(fractions))
    if "training" in parts:
        count += len(workloads[estimate_model][2])  # the loader at each batch
    return count + (4 * len(study_model_folders()) if "study" in parts else 0)


def run(device: torch.device, tiny: bool, budget_s: float, parts: tuple[str, ...] = PARTS) -> dict:
    """The measurements of `parts`, in about `budget_s` seconds of timed calls (plus warmups, compilation
    and model builds)."""
    import timm

    started = time.perf_counter()
    use_tensor_cores(device)
    workloads, fractions = (TINY_WORKLOADS, TINY_FRACTIONS) if tiny else (WORKLOADS, INFERENCE_FRACTIONS)
    estimate_model = next(iter(workloads))  # the CIFAR ViT-Tiny: the model of the paper profile
    missing = [module for module in ("onnxruntime", "onnxscript") if importlib.util.find_spec(module) is None]
    skipped = {"onnx": f"{' and '.join(missing)} not installed"} if "onnx" in parts and missing else {}
    parts = tuple(part for part in parts if part not in skipped)
    seconds = budget_s / max(1, _measure_count(workloads, fractions, parts, estimate_model))
    result = {
        "device": _device_info(device),
        "timm": timm.__version__,
        "settings": {"tiny": tiny, "budget_s": budget_s, "seconds_per_measure": seconds, "parts": list(parts)},
        "skipped": skipped,
    }
    if "training" in parts:
        training = bench_training(workloads, device, seconds)
        loader_batches = sorted({r["batch"] for r in training if r["model"] == estimate_model})
        loader_rates = {batch: loader_images_per_s(batch, device, seconds) for batch in loader_batches}
        result["training"] = training
        result["loader"] = [{"batch": b, "images_per_s": rate} for b, rate in sorted(loader_rates.items())]
        result["paper_profile_estimate"] = paper_profile_estimate(training, loader_rates, estimate_model)
    if "inference" in parts:
        result["inference"] = bench_inference(workloads, device, seconds, fractions)
    if "onnx" in parts:
        result["onnx_cpu"] = bench_onnx_cpu(workloads, seconds, fractions)
    if "study" in parts:
        result["study_models_batch1"] = bench_study_models(device, seconds)
    result["wall_s"] = time.perf_counter() - started
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a small ViT at small batches: tries the benchmark on a CPU")
    parser.add_argument("--out", type=Path, help="default reports/benchmarks/gpu.json (a CPU run must name its own)")
    parser.add_argument("--budget-s", type=float, default=120.0, help="seconds of timed calls in all (default 120)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here; try the benchmark with --device cpu --tiny --out FILE")
    if args.out is None and args.device != "cuda":
        parser.error("a CPU run tries the benchmark, it does not measure a GPU: name its --out (not gpu.json)")
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        parser.error(f"--budget-s {args.budget_s}: must be a number of seconds > 0")
    out = args.out or REPORTS / "benchmarks" / "gpu.json"
    result = run(torch.device(args.device), args.tiny, args.budget_s, tuple(args.parts))
    atomic_write(out, lambda p: p.write_text(json.dumps(result, indent=2, allow_nan=False)))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(cli(main))
