"""Deployment formats for an extracted model: ONNX (checked against PyTorch in onnxruntime) and
`torch.export`. The batch dimension stays dynamic in both."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .files import atomic_write
from .pruned import PrunedViT, check_has_values

ONNX_OPSET = 18
INPUT, OUTPUT = "images", "logits"


def _example(model: PrunedViT, batch_size: int = 2) -> torch.Tensor:
    """Random images of the model's input shape, on its device and in its dtype."""
    spec, weight = model.spec, model.patch_embed.proj.weight
    return torch.randn(batch_size, spec.in_chans, *spec.img_size, dtype=weight.dtype, device=weight.device)


def _check_extracted(model: PrunedViT, what: str) -> None:
    if not isinstance(model, PrunedViT):
        raise TypeError(f"{what} needs an extracted PrunedViT (hiap_core.extract or load_pruned), got {type(model).__name__}")
    check_has_values(model, what)


def export_program(model: PrunedViT) -> torch.export.ExportedProgram:
    """`torch.export` of an extracted model (eval mode, on its device and in its dtype), with a dynamic batch
    dimension."""
    _check_extracted(model, "export")
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        return torch.export.export(model.eval(), (_example(model),), dynamic_shapes=({0: batch},))


def export_onnx(model: PrunedViT, path: str | os.PathLike, check: bool = True, atol: float = 1e-4) -> Path:
    """Write `model` as one self-contained ONNX file (input `images`, output `logits`, dynamic batch).

    With `check`, onnxruntime runs it on random images and the largest difference from PyTorch must be
    <= `atol`, else a ValueError is raised and no file is left behind."""
    return _export(model, path, check, atol)[0]


def onnx_runtime(model: PrunedViT, path: str | os.PathLike, threads: int | None = None, atol: float = 1e-4):
    """Export `model` to `path` (checked as in `export_onnx`) and open an onnxruntime session on it;
    returns (session, the largest |onnxruntime - PyTorch| the check measured)."""
    path, diff = _export(model, path, True, atol)
    return onnx_session(path, threads), diff


def _export(model: PrunedViT, path: str | os.PathLike, check: bool, atol: float) -> tuple[Path, float | None]:
    _check_extracted(model, "ONNX export")
    weight = model.patch_embed.proj.weight
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise ValueError(
            f"ONNX export takes an fp32 model on the CPU, where onnxruntime checks the file against PyTorch; this one is "
            f"{str(weight.dtype).removeprefix('torch.')} on {weight.device}: export model.float().cpu() (a copy)"
        )
    program = export_program(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own progress chatter
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=[INPUT],
            output_names=[OUTPUT],
            external_data=False,
            verbose=False,
        )
    diff = None

    def write(tmp: Path) -> None:
        nonlocal diff
        onnx_program.save(str(tmp), external_data=False)
        if check:
            diff = onnx_max_abs_diff(model, tmp)
            if diff > atol:
                raise ValueError(f"onnxruntime output differs from PyTorch by {diff:.3g} > {atol:g}")

    return atomic_write(path, write), diff


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # ORT's workers busy-wait after each run by default, which steals the cores from whatever runs next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_max_abs_diff(model: nn.Module, path: str | os.PathLike, batch_sizes=(1, 5)) -> float:
    """Largest |onnxruntime - PyTorch| over random batches of the given sizes."""
    session = onnx_session(path)
    worst = 0.0
    for batch in batch_sizes:
        x = _example(model, batch)
        with torch.inference_mode():
            expected = model.eval()(x).numpy()
        got = session.run([OUTPUT], {INPUT: x.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst
