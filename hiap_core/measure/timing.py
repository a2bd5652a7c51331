"""Timing that compares models fairly on a noisy machine: each callable runs once per round, in turn,
so drift and background load hit all alike; medians and ratios are what to read."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm  # console bars: tqdm.auto warns in kernels without ipywidgets


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


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if cpuinfo.exists()
        else []
    )
    cpu = names[0] if names else platform.processor()
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
