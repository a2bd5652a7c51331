"""HiAP objective terms (hiap_core/DESIGN.md, "Loss" and "Feasibility penalties") and the temperature schedule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cost import ExpectedCost
from .gated_vit import gated_blocks


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """`(1 - alpha) CE + alpha T^2 KL(teacher/T || student/T)`; plain CE when there is no teacher."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"kd alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"kd temperature must be > 0, got {temperature}")
    ce = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    if teacher_logits is None or alpha == 0.0:
        return ce
    kl = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits.detach() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - alpha) * ce + alpha * temperature**2 * kl


def cost_penalties(expected: ExpectedCost) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_macro, L_micro): expected macro and micro cost over the dense prunable cost. Their sum is the
    expected fraction of prunable compute kept (1.0 for the dense model)."""
    return expected.macro / expected.dense_prunable, expected.micro / expected.dense_prunable


def feasibility_penalty(
    gated: nn.Module, min_heads: float = 1.0, min_value_fraction: float = 0.125, min_neuron_fraction: float = 0.125
) -> torch.Tensor:
    """`sum_l relu(k_min - sum_h p(g))^2` plus, weighted by each live structure's macro probability,
    `relu(frac_min - mean p(d))^2` per head and `relu(frac_min - mean p(c))^2` per FFN."""
    blocks = gated_blocks(gated)
    num_heads = blocks[0][0].num_heads
    if not 0 <= min_heads <= num_heads:
        raise ValueError(f"min_heads must be in [0, {num_heads}] (heads per layer), got {min_heads}")
    for name, value in (("min_value_fraction", min_value_fraction), ("min_neuron_fraction", min_neuron_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    total = 0
    for attn, mlp in blocks:
        p_head = attn.head_gate.probs()
        p_value = attn.value_gate.probs().view(attn.num_heads, attn.head_dim)
        total = total + F.relu(min_heads - p_head.sum()) ** 2
        total = total + (p_head * F.relu(min_value_fraction - p_value.mean(dim=1)) ** 2).sum()
        total = total + mlp.block_gate.probs()[0] * F.relu(min_neuron_fraction - mlp.neuron_gate.probs().mean()) ** 2
    return total


def temperature_at(step: int, total_steps: int, tau0: float = 2.0, tau_min: float = 0.5) -> float:
    """Exponential annealing `tau0 -> tau_min` over `total_steps`; `tau_min` from then on."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not (math.isfinite(tau0) and math.isfinite(tau_min)) or tau_min <= 0 or tau0 <= 0:
        raise ValueError(f"temperatures must be finite and > 0, got tau0={tau0}, tau_min={tau_min}")
    if tau_min > tau0:
        raise ValueError(f"tau_min ({tau_min}) must not exceed tau0 ({tau0})")
    progress = min(max(step, 0), total_steps) / total_steps
    return tau0 * (tau_min / tau0) ** progress
