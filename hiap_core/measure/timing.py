"""The machine a timing ran on, recorded beside it (the timing itself: `core.timing`)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if cpuinfo.exists()
        else []
    )
    cpu = names[0] if names else platform.processor()
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
