"""Latency of the study's extracted models against the dense one, in PyTorch and onnxruntime, timed
alternately (`core.timing.alternate`) so machine drift hits every model alike."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm  # console bars: tqdm.auto warns in kernels without ipywidgets

from ..core.cost import count_macs
from ..core.export import INPUT as ONNX_INPUT, onnx_runtime
from ..core.inference import optimize_for_inference
from ..core.pruned import PrunedViT, load_pruned
from ..core.timing import alternate, median_ms, models_ms
from ..measure.cost_table import predict_ms
from ..train.paths import RUNS
from ..train.runs import run_metrics


def load_models(names: list[str]) -> dict[str, PrunedViT]:
    """The extracted model of each study run."""
    return {name: load_pruned(RUNS / name / "model") for name in names}


def onnx_runtimes(models: dict[str, PrunedViT], threads: int = 2) -> dict[str, tuple]:
    """Each model exported to ONNX once (checked against PyTorch) with its onnxruntime session:
    {name: (session, largest |onnxruntime - PyTorch|)}. Sessions hold the model, so the files can go."""
    with tempfile.TemporaryDirectory() as tmp:
        return {
            name: onnx_runtime(model, Path(tmp) / f"{name}.onnx", threads)
            for name, model in tqdm(models.items(), desc="ONNX export", leave=False, disable=None)
        }


def latency_table(
    models: dict[str, PrunedViT],
    runtimes: dict[str, tuple] | None,
    batches: dict[int, int],
    threads: int = 2,
    optimize: bool = False,
) -> pd.DataFrame:
    """Median latency of each extracted model vs the `dense` one, measured alternately, in PyTorch and (with
    `runtimes` from `onnx_runtimes`) in onnxruntime, with the ONNX export's largest difference from PyTorch;
    with `optimize`, also both through `optimize_for_inference` (compiled for each batch)."""
    torch.set_num_threads(threads)
    dense = models["dense"]
    rows = []
    for batch, runs in batches.items():
        x = torch.randn(batch, dense.spec.in_chans, *dense.spec.img_size)
        feed = {ONNX_INPUT: x.numpy()}
        optimized_dense = optimize_for_inference(dense, x) if optimize else None  # a fair comparison optimizes both
        for name, model in tqdm(models.items(), desc=f"latency, batch {batch}", leave=False, disable=None):
            fns = {"dense": dense, "model": model}
            if optimize:
                optimized = optimized_dense if model is dense else optimize_for_inference(model, x)
                fns.update(optimized_dense=optimized_dense, optimized_model=optimized)
            ms = models_ms(fns, x, runs, warmup=3)
            mac_ratio = count_macs(dense) / count_macs(model)
            row = {
                "run": name,
                "batch": batch,
                "runs": runs,
                "dense_ms": ms["dense"],
                "model_ms": ms["model"],
                "speedup": ms["dense"] / ms["model"],
                "mac_ratio": mac_ratio,
                "speedup_over_mac_ratio": ms["dense"] / ms["model"] / mac_ratio,
            }
            if optimize:
                speedup = ms["optimized_dense"] / ms["optimized_model"]
                row.update(
                    optimized_dense_ms=ms["optimized_dense"],
                    optimized_model_ms=ms["optimized_model"],
                    optimized_speedup=speedup,
                    optimized_speedup_over_mac_ratio=speedup / mac_ratio,
                    optimized_over_eager=ms["model"] / ms["optimized_model"],
                    optimized_layout=fns["optimized_model"].attention_layout,
                    optimized_max_abs_diff=fns["optimized_model"].max_abs_diff,
                )
            if runtimes:  # timed apart from PyTorch: the two runtimes' thread pools do not share the cores well
                (dense_session, _), (session, diff) = runtimes["dense"], runtimes[name]
                ort = alternate(
                    {"dense": lambda: dense_session.run(None, feed), "model": lambda s=session: s.run(None, feed)}, runs, warmup=3
                )
                ort_ms = median_ms(ort)
                row.update(
                    ort_dense_ms=ort_ms["dense"],
                    ort_model_ms=ort_ms["model"],
                    ort_speedup=ort_ms["dense"] / ort_ms["model"],
                    onnx_max_abs_diff=diff,
                )
            rows.append(row)
    return pd.DataFrame(rows)


def latency_vs_macs_target(
    models: dict[str, PrunedViT],
    runtimes: dict[str, tuple],
    macs_run: str,
    latency_run: str,
    cost_table: dict,
    runs: int,
    threads: int = 2,
) -> pd.DataFrame:
    """The MACs-targeted and the latency-targeted run side by side: MACs, the cost table's predicted latency,
    latency measured alternately with the dense model (PyTorch, then onnxruntime) at the table's batch size,
    accuracy, and the speedup of each over the MACs-targeted one from the same alternating loop."""
    torch.set_num_threads(threads)
    names = ["dense", macs_run, latency_run]
    spec = models["dense"].spec
    x = torch.randn(cost_table["batch_size"], spec.in_chans, *spec.img_size)
    torch_ms = models_ms({name: models[name] for name in names}, x, runs, warmup=3)
    feed = {ONNX_INPUT: x.numpy()}
    ort_ms = median_ms(alternate({name: lambda s=runtimes[name][0]: s.run(None, feed) for name in names}, runs, warmup=3))
    rows = []
    for name, target in ((macs_run, "MACs"), (latency_run, "latency")):
        m = run_metrics(name)
        predicted = predict_ms(cost_table["coefficients"], models[name].spec) / cost_table["dense_predicted_ms"]
        rows.append(
            {
                "run": name,
                "targets": target,
                "target_fraction": m["budget"]["target_fraction"],
                "macs_fraction": m["macs_fraction"],
                "predicted_latency_fraction": predicted,
                "measured_latency_fraction": torch_ms[name] / torch_ms["dense"],
                "ort_latency_fraction": ort_ms[name] / ort_ms["dense"],
                "model_ms": torch_ms[name],
                "ort_model_ms": ort_ms[name],
                "accuracy_pct": 100 * m["test_acc"],
                "speedup_vs_macs_targeted": torch_ms[macs_run] / torch_ms[name],
                "ort_speedup_vs_macs_targeted": ort_ms[macs_run] / ort_ms[name],
            }
        )
    return pd.DataFrame(rows)
