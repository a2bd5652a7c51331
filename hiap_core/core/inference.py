"""`optimize_for_inference`: a model (extracted or dense, any eval-mode module) in its fastest form for one
device, input shape and dtype, checked against eager on the example batch before it is handed back.

- CPU: `torch.compile` with inductor's freezing (weights folded in as constants, prepacked for oneDNN).
- CUDA: `torch.compile(mode="reduce-overhead")`: CUDA graphs, one replay per call instead of a launch
  per kernel, which is what a small ViT on a GPU is bound by.
- An extracted model whose heads keep different value widths is compiled in both attention layouts (per
  head, padded: `PrunedAttention`), each timed on the example batch, and the faster one kept: the choice
  is measured as deployed, on the device that runs the model.

reports/benchmarks/core.json times eager and optimized, dense and extracted, on 2 CPU threads.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import first_line
from .pruned import PrunedAttention, set_padded_attention
from .timing import models_ms

LAYOUTS = ("auto", "per_head", "padded")
# Largest |optimized - eager| allowed, relative to max(1, largest |eager logit|), by output dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# Every model compiles the same `forward` code again with its own shapes; past dynamo's default limit (8)
# it runs eager with no more than a logged warning (and eager passes the check), so a benchmark holding a
# dozen models needs a higher one. Raised for the process, never lowered.
RECOMPILE_LIMIT = 64


class InferenceModel(nn.Module):
    """A compiled model for inference: call it like the model. Calls run in inference mode (outputs are
    inference tensors: clone one to change it in place); `.to()` or `.train()` reach the wrapped model,
    not the compiled code: optimize again instead."""

    def __init__(self, model: nn.Module, compiled, attention_layout: str, tolerance: float):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_compiled", compiled)  # not a second submodule: the state dict stays the model's
        self.attention_layout, self.tolerance, self.max_abs_diff = attention_layout, tolerance, float("nan")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # freezing is read while tracing, so a new shape's recompilation must see it too
        with torch.inference_mode(), torch._inductor.config.patch(freezing=x.device.type == "cpu"):
            out = self._compiled(x)
        # CUDA graphs reuse their output memory at the next call: hand back a tensor of the caller's own.
        return out.clone() if x.device.type == "cuda" else out


def _layouts(model: nn.Module, attention_layout: str) -> list[str]:
    if attention_layout not in LAYOUTS:
        raise ValueError(f"attention_layout = {attention_layout!r}: choose one of {', '.join(LAYOUTS)}")
    mixed = [m for m in model.modules() if isinstance(m, PrunedAttention) and not m.values_as_wide_as_qk]
    if not mixed:  # a dense or timm model, or heads all as wide as Q/K: one fused call already
        return ["n/a"]
    return ["per_head", "padded"] if attention_layout == "auto" else [attention_layout]


def _compiled(model: nn.Module, layout: str, x: torch.Tensor, reference: torch.Tensor) -> InferenceModel:
    """`model` in `layout`, compiled for `x` and checked against eager's `reference` output."""
    set_padded_attention(model, layout == "padded")
    if x.device.type == "cuda":
        compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)
    else:
        compiled = torch.compile(model, dynamic=False)
    optimized = InferenceModel(model, compiled, layout, TOLERANCE.get(reference.dtype, TOLERANCE[torch.float32]))
    try:
        for _ in range(2):  # the first call compiles; CUDA graphs record on a later one
            out = optimized(x)
    except torch._dynamo.exc.BackendCompilerFailed as err:
        raise RuntimeError(
            f"torch.compile failed on this machine ({first_line(err.inner_exception)[:200]}): on CPU it needs a C++ "
            "compiler (gcc or clang on PATH); use the eager model meanwhile"
        ) from err
    diff = float((out.float() - reference.float()).abs().max())
    allowed = optimized.tolerance * max(1.0, float(reference.float().abs().max()))
    if not diff <= allowed:
        raise RuntimeError(
            f"the compiled model ({layout} attention) differs from eager by {diff:.3g} on the example batch "
            f"(allowed {allowed:.3g}); use the eager model and report the model and torch version"
        )
    optimized.max_abs_diff = diff
    return optimized


def optimize_for_inference(model: nn.Module, example_batch: torch.Tensor, attention_layout: str = "auto") -> InferenceModel:
    """A copy of `model` in eval mode, compiled for `example_batch`'s device, shape and dtype (`model` itself is
    left as it was); other shapes recompile on first use. The weights are folded in: optimize again after
    changing them. `attention_layout`: 'auto' compiles both layouts of an extracted model with heads of
    different widths and keeps the faster on the example batch; 'per_head' or 'padded' takes that one.

    The compiled model's output on `example_batch` must match eager within `TOLERANCE` (by dtype), else a
    RuntimeError is raised; the measured difference is kept as `.max_abs_diff`, the layout as `.attention_layout`.
    """
    if not isinstance(example_batch, torch.Tensor) or example_batch.dim() != 4:
        raise ValueError("example_batch must be a (batch, channels, height, width) tensor of images, on the model's device")
    model = copy.deepcopy(model).eval()
    layouts = _layouts(model, attention_layout)
    with torch.inference_mode():
        reference = model(example_batch)
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    candidates = {
        layout: _compiled(model if i == 0 else copy.deepcopy(model), layout, example_batch, reference)
        for i, layout in enumerate(layouts)
    }
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    ms = models_ms(candidates, example_batch, 15)
    return candidates[min(ms, key=ms.get)]
