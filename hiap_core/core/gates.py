"""Gumbel-Sigmoid gates with a straight-through estimator (hiap_core/DESIGN.md, "Gates")."""

from __future__ import annotations

import math

import torch
from torch import nn


class _StraightThrough(torch.autograd.Function):
    """Forward: exact 0/1 (soft > 0.5). Backward: identity, so the gradient reaches the soft sample."""

    @staticmethod
    def forward(ctx, soft: torch.Tensor) -> torch.Tensor:
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _check_temperature(tau: float) -> float:
    tau = float(tau)
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"gate temperature must be a finite number > 0, got {tau}")
    return tau


class GumbelSigmoidGate(nn.Module):
    """One learnable logit per unit.

    Training: `s = sigmoid((logits + eps) / tau)`, `eps ~ Logistic(0, 1)`. The hard forward (default)
    outputs `1[s > 0.5]` with the gradient of `s` (straight-through): a unit is on with probability exactly
    `sigmoid(logits)`, whatever `tau`. The soft forward (`soft = True`) outputs `s` itself, which sharpens
    toward 0/1 as `tau` falls (hiap_core/DESIGN.md, "Gates"). Eval, and training once `frozen`:
    deterministic `logits > 0`.
    """

    soft = False  # forward the relaxed sample instead of its hard threshold
    frozen = False  # the structure search is over: hard and deterministic in training too

    def __init__(self, num_units: int, init_logit: float = 3.0, tau: float = 2.0):
        super().__init__()
        if int(num_units) != num_units or num_units < 1:
            raise ValueError(f"a gate needs num_units >= 1, got {num_units}")
        if not math.isfinite(float(init_logit)):
            raise ValueError(f"gate init_logit must be finite, got {init_logit}")
        self.logits = nn.Parameter(torch.full((int(num_units),), float(init_logit)))
        # A tensor, not a Python float, in the forward: torch.compile would recompile at every new tau
        self.register_buffer("temperature", torch.empty(()), persistent=False)
        self.tau = tau

    @property
    def tau(self) -> float:
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        self._tau = _check_temperature(value)
        self.temperature.fill_(self._tau)

    def forward(self) -> torch.Tensor:
        if not self.training or self.frozen:
            return self.hard().to(self.logits.dtype)
        # Sampled in fp32 under mixed precision too: in bf16 (8 significant bits) s rounds to exactly 0.5 for
        # 0 < a + eps < tau / 128, and the hard threshold s > 0.5 would close units that should be open.
        with torch.autocast(self.logits.device.type, enabled=False):
            u = torch.rand_like(self.logits).clamp_(1e-6, 1.0 - 1e-6)
            relaxed = torch.sigmoid((self.logits + torch.log(u) - torch.log1p(-u)) / self.temperature)
        return relaxed if self.soft else _StraightThrough.apply(relaxed)

    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def hard(self) -> torch.Tensor:
        """The hardened state: a unit is kept iff its logit > 0 (probability > 0.5)."""
        return self.logits.detach() > 0

    def extra_repr(self) -> str:
        return f"num_units={self.logits.numel()}, tau={self.tau:g}, soft={self.soft}, frozen={self.frozen}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A plain timm checkpoint has no gate logits: keep the initial ones so strict loading still works.
        state_dict.setdefault(prefix + "logits", self.logits.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
