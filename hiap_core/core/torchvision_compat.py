"""Let `import torchvision` (hence `import timm`) succeed when torchvision's compiled ops cannot load.

The pinned torchvision 0.28.0 wheel is built against a CUDA torch; with the CPU torch wheel its `_C`
extension fails to load, and torchvision's import then dies registering fake kernels for
`torchvision::nms` / `torchvision::qnms`, operators that were never defined. Defining just those two
schemas lets the import finish; calling them still fails, which is right: HiAP never uses them.
Nothing happens when the extension loads (a matching torch/torchvision pair) or torchvision is absent.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

MISSING_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_fragment: torch.library.Library | None = None  # kept alive: dropping it would unregister the schemas


def torchvision_extension_path() -> Path | None:
    """Path of torchvision's compiled `_C` extension, or None when torchvision is not installed."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for candidate in sorted(Path(folder).glob("_C.*")):
            if candidate.suffix in (".so", ".pyd", ".dylib"):
                return candidate
    return None


def extension_loads(path: Path) -> bool:
    try:
        torch.ops.load_library(str(path))
    except (OSError, ImportError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> bool:
    """Define the missing operator schemas if (and only if) torchvision's extension cannot load.

    Returns True when it had to act. Must run before torchvision is first imported.
    """
    global _fragment
    if _fragment is not None or "torchvision" in sys.modules:
        return False
    path = torchvision_extension_path()
    if path is None or extension_loads(path):
        return False
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    for schema in MISSING_OP_SCHEMAS:
        _fragment.define(schema)
    return True


ensure_torchvision_importable()
