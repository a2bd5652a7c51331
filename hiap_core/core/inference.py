"""`optimize_for_inference`: a model (extracted or dense, any eval-mode module) in its fastest form for one
device, input shape and dtype, checked against eager on the example batch before it is handed back.

- CPU: `torch.compile` with inductor's freezing (weights folded in as constants, prepacked for oneDNN).
  On 2 threads it beats eager and TorchScript freezing at batch 1 and 64 (reports/benchmarks/core.json).
- CUDA: `torch.compile(mode="reduce-overhead")`: CUDA graphs, one replay per call instead of a launch
  per kernel, which is what a small ViT on a GPU is bound by.
- An extracted model's attention layout (per head or padded, `PrunedAttention`) is timed on the example
  batch and the faster one kept, so the choice is measured on the device that runs the model.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from .pruned import PrunedAttention, set_padded_attention

LAYOUTS = ("auto", "per_head", "padded")
# Largest |optimized - eager| allowed, relative to max(1, largest |eager logit|), by output dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# Every model compiles the same `forward` code again with its own shapes; past dynamo's default limit (8)
# it would silently fall back to eager, so a benchmark holding a dozen models needs a higher one.
RECOMPILE_LIMIT = 64


class InferenceModel(nn.Module):
    """A compiled model for inference: call it like the model (inference mode is applied inside)."""

    def __init__(self, model: nn.Module, compiled, attention_layout: str, max_abs_diff: float, tolerance: float):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_compiled", compiled)  # not a second submodule: the state dict stays the model's
        self.attention_layout, self.max_abs_diff, self.tolerance = attention_layout, max_abs_diff, tolerance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self._compiled(x)
        # CUDA graphs reuse their output memory at the next call: hand back a tensor of the caller's own.
        return out.clone() if x.device.type == "cuda" else out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def faster_layout(model: nn.Module, x: torch.Tensor, rounds: int = 15) -> str:
    """'per_head' or 'padded', whichever runs `model` on `x` faster in eager mode (alternating, medians)."""
    times = {"per_head": [], "padded": []}
    with torch.inference_mode():
        for round_index in range(rounds + 2):  # two warm-up rounds
            for layout in times:
                set_padded_attention(model, layout == "padded")
                _synchronize(x.device)
                start = time.perf_counter()
                model(x)
                _synchronize(x.device)
                if round_index >= 2:
                    times[layout].append(time.perf_counter() - start)
    return min(times, key=lambda layout: statistics.median(times[layout]))


def _choose_layout(model: nn.Module, x: torch.Tensor, attention_layout: str) -> str:
    if attention_layout not in LAYOUTS:
        raise ValueError(f"attention_layout = {attention_layout!r}: choose one of {', '.join(LAYOUTS)}")
    mixed = [m for m in model.modules() if isinstance(m, PrunedAttention) and not m.values_as_wide_as_qk]
    if not mixed:  # a dense or timm model, or heads all as wide as Q/K: one fused call already
        return "n/a"
    layout = faster_layout(model, x) if attention_layout == "auto" else attention_layout
    set_padded_attention(model, layout == "padded")
    return layout


def optimize_for_inference(model: nn.Module, example_batch: torch.Tensor, attention_layout: str = "auto") -> InferenceModel:
    """A copy of `model` in eval mode, compiled for `example_batch`'s device, shape and dtype (`model` itself is
    left as it was); other shapes recompile on first use. The weights are folded in: optimize again after
    changing them.

    The compiled model's output on `example_batch` must match eager within `TOLERANCE` (by dtype), else a
    RuntimeError is raised; the measured difference is kept as `.max_abs_diff`, the layout as `.attention_layout`.
    """
    if not isinstance(example_batch, torch.Tensor) or example_batch.dim() != 4:
        raise ValueError("example_batch must be a (batch, channels, height, width) tensor of images, on the model's device")
    model = copy.deepcopy(model).eval()
    layout = _choose_layout(model, example_batch, attention_layout)
    with torch.inference_mode():
        reference = model(example_batch)
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    if example_batch.device.type == "cuda":
        compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)
    else:
        compiled = torch.compile(model, dynamic=False, options={"freezing": True})
    tolerance = TOLERANCE.get(reference.dtype, TOLERANCE[torch.float32])
    optimized = InferenceModel(model, compiled, layout, float("nan"), tolerance)
    try:
        for _ in range(2):  # the first call compiles; CUDA graphs record on a later one
            out = optimized(example_batch)
    except torch._dynamo.exc.BackendCompilerFailed as err:
        reason = (str(err) or type(err).__name__).splitlines()[0][:200]
        raise RuntimeError(
            f"torch.compile failed on this machine ({reason}): on CPU it needs a C++ compiler (gcc or clang on PATH); "
            "use the eager model meanwhile"
        ) from err
    diff = float((out.float() - reference.float()).abs().max())
    scale = max(1.0, float(reference.float().abs().max()))
    if not diff <= tolerance * scale:
        raise RuntimeError(
            f"the compiled model differs from eager by {diff:.3g} on the example batch (allowed {tolerance * scale:.3g}); "
            "use the eager model and report the model and torch version"
        )
    optimized.max_abs_diff = diff
    return optimized
