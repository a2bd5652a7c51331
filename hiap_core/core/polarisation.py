"""How decided the gates are when the search ends: the part of the structure the rounding would settle
(hiap_core/DESIGN.md, "How decided the search is at the freeze").

Each gate is weighted by the dense cost its own decision carries: a head its Q/K cost (`alpha`), a value
dim `beta`, a neuron `gamma`, and an FFN block gate its block's neurons (`gamma * hidden`), which its neurons
carry too, so the weights sum to more than the prunable cost; every share here is of that sum (the gated
cost). A unit hardens by the sign of its logit, so its disagreement with the hardened structure is
`min(p, 1 - p)`: on the open side what an open unit's probability lacks, on the closed side what a closed one
keeps.
"""

from __future__ import annotations

import torch
from torch import nn

from .cost import UnitCosts
from .gated_vit import gated_blocks

UNDECIDED_LOGIT = 1.0  # |logit| below this (p within 0.27-0.73): a unit the search has not decided


def weighted_logits(gated: nn.Module, costs: UnitCosts) -> tuple[torch.Tensor, torch.Tensor]:
    """Every gate logit of `gated` (flat, with its gradient) and the dense cost its decision carries."""
    logits, weights = [], []
    for attn, mlp in gated_blocks(gated):
        hidden = mlp.neuron_gate.logits.numel()
        for gate, weight in (
            (attn.head_gate, costs.alpha),
            (attn.value_gate, costs.beta),
            (mlp.block_gate, costs.gamma * hidden),
            (mlp.neuron_gate, costs.gamma),
        ):
            logits.append(gate.logits.float().flatten())
            weights.append(torch.full_like(logits[-1], float(weight)).detach())
    return torch.cat(logits), torch.cat(weights)


def undecided_term(gated: nn.Module, costs: UnitCosts) -> torch.Tensor:
    """`sum w p (1 - p) / sum w` (at most 0.25): the polarising term (`hiap.lambda_polarise`), whose gradient
    pushes every gate away from p = 0.5, the open ones up and the closed ones down."""
    logits, weights = weighted_logits(gated, costs)
    p = torch.sigmoid(logits)
    return (weights * p * (1 - p)).sum() / weights.sum()


def _quartiles(values: torch.Tensor) -> list[float] | None:
    """Lower quartile, median and upper quartile; None where there is no value (JSON has no NaN)."""
    if not len(values):
        return None
    return [float(q) for q in torch.quantile(values.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.double))]


@torch.no_grad()
def polarisation(gated: nn.Module, costs: UnitCosts) -> dict:
    """The cost-weighted disagreement `D = sum w min(p, 1 - p) / sum w`, split into its open and closed sides,
    the share of the gated cost whose |logit| < 1, and the quartiles of the open and the closed logits."""
    logits, weights = weighted_logits(gated, costs)
    logits, weights = logits.detach().cpu(), weights.cpu()
    p, is_open, total = torch.sigmoid(logits.double()), logits > 0, float(weights.sum())
    open_side = float((weights * (1 - p))[is_open].sum()) / total
    closed_side = float((weights * p)[~is_open].sum()) / total
    return {
        "disagreement": open_side + closed_side,
        "disagreement_open": open_side,
        "disagreement_closed": closed_side,
        "undecided_share": float(weights[logits.abs() < UNDECIDED_LOGIT].sum()) / total,
        "open_logit_quartiles": _quartiles(logits[is_open]),
        "closed_logit_quartiles": _quartiles(logits[~is_open]),
        "units": len(logits),
    }
