"""Timing that compares models fairly on a noisy machine: each callable runs once per round, in turn,
so drift and background load hit all alike; medians and ratios are what to read. On a GPU each call is
timed between two synchronisations, so the time is the kernels', not their launch. `machine` names what a
timing or a training run ran on."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm  # console bars: tqdm.auto warns in kernels without ipywidgets


def machine() -> dict:
    """The CPU model, torch's thread count, torch's and Python's versions: weights trained with another thread
    count differ in their bits (same structure and accuracy), so every run and timing records them."""
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if cpuinfo.exists()
        else []
    )
    cpu = names[0] if names else platform.processor()
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    fns: dict, rounds: int, warmup: int = 2, progress: bool = False, device: torch.device | None = None
) -> dict[str, list[float]]:
    """Run each callable once per round, in turn, after `warmup` such rounds; return its wall times (seconds).
    `device`: where the callables run, to synchronise around each call on a GPU."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in tqdm(range(rounds), desc="timing rounds", disable=not progress, leave=False):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(times: dict[str, list[float]]) -> dict[str, float]:
    """Each callable's median time from `alternate`, in milliseconds."""
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def models_ms(models: dict, x: torch.Tensor, runs: int, warmup: int = 2, progress: bool = False) -> dict[str, float]:
    """Each model's median time (ms) of a forward on `x`, in inference mode, the models alternating (`alternate`
    on `x`'s device): the one way the project times models against each other."""
    with torch.inference_mode():
        calls = {name: lambda m=m: m(x) for name, m in models.items()}
        return median_ms(alternate(calls, runs, warmup=warmup, progress=progress, device=x.device))
