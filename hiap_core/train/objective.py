"""What a training step minimises and at what rate: the loss of one batch (cross-entropy, KD, HiAP's
penalties), under autocast where the run asks for it, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.losses import kd_loss
from ..core.pruner import Pruner
from .config import RunConfig
from .device import autocast


def step_loss(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: RunConfig,
    teacher: nn.Module | None = None,
    pruner: Pruner | None = None,
    amp_dtype: torch.dtype | None = None,
    cached: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The loss of one batch under `loss`, with its terms: cross-entropy without a teacher (dense), KD from
    the teacher (baselines), KD plus HiAP's penalties with a pruner. The student and teacher forwards run
    under autocast to `amp_dtype`; the losses and penalties outside it, in fp32 (a bf16 KL of two close
    distributions, or a penalty summed over thousands of gates, would lose the small differences that train).
    `cached`: the teacher's logits of this batch, read from its cache instead of a teacher forward."""
    with autocast(amp_dtype, x.device):
        logits = net(x)
        teacher_logits = cached
        if teacher is not None and cached is None:
            with torch.no_grad():
                teacher_logits = teacher(x)
    logits = logits.float()
    if teacher is None:
        task = F.cross_entropy(logits, y, label_smoothing=cfg.optim.label_smoothing)
        return {"loss": task, "task": task}
    task = kd_loss(logits, teacher_logits.float(), y, cfg.hiap.kd_alpha, cfg.hiap.kd_temperature, cfg.optim.label_smoothing)
    return pruner.loss(task) if pruner is not None else {"loss": task, "task": task}


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + 0.5 * (1 - min_ratio) * (1 + math.cos(math.pi * min(progress, 1.0)))
