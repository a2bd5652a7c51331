"""Where a run computes and in what precision: one process or a torchrun rank (gloo on CPU, nccl on GPU),
autocast by `optim.amp`, TF32 on CUDA."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .config import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()


def setup_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, torch.device(f"cuda:{local}" if cuda else "cpu"))


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `optim.amp` on `device`; None: no autocast, plain fp32. `auto` is bf16 on a CUDA
    GPU that has it and fp32 elsewhere (fp16 needs loss scaling: only on request). An explicit bf16 or
    fp16 where it cannot run is refused rather than silently trained in fp32."""
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if amp == "auto":
        return torch.bfloat16 if bf16_gpu else None
    if amp == "off":
        return None
    if device.type != "cuda" or (amp == "bf16" and not bf16_gpu):
        where = "this GPU has no bf16" if device.type == "cuda" else f"this run is on {device.type}"
        raise ConfigError(f"invalid config: optim.amp = {amp!r}: needs a CUDA GPU with {amp} ({where}); use auto or off")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(dtype: torch.dtype | None, device: torch.device):
    """Mixed precision for the forward passes under `dtype`; nothing at all for None (CPU stays bit-exact)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def use_tensor_cores(device: torch.device) -> None:
    """TF32 for the fp32 matmuls and convolutions on CUDA (those autocast leaves in fp32, and all of them with
    `amp: off`): a 10-bit mantissa inside the product, fp32 accumulation, several times the fp32 speed."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
