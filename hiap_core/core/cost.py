"""Exact MACs (hiap_core/DESIGN.md, "MACs"): every Linear/Conv plus the two attention matmuls; norms,
activations, softmax, biases and adds count 0. Batch size 1. The same linear cost structure also takes
measured per-unit latencies (`load_cost_table`), so penalties and budgets work in either unit."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .describe import describe
from .gated_vit import gated_blocks
from .spec import LayerSpec, ViTSpec


@dataclass(frozen=True)
class UnitCosts:
    """Marginal cost of one prunable unit in one block (identical for every block of a plain ViT) and the
    cost no gate removes: MACs (`unit_costs`) or measured milliseconds (`load_cost_table`)."""

    alpha: float  # per live head: Q and K projections (+ q k^T)
    beta: float  # per live value dim: V projection and proj column (+ attn v)
    gamma: float  # per live FFN neuron: fc1 row and fc2 column
    static: float  # patch embedding and classifier (MACs); everything else that does not shrink (latency)
    unit: str = "MACs"

    @classmethod
    def from_coefficients(cls, coefficients: dict, unit: str) -> UnitCosts:
        """From a latency table's `coefficients` (`static`, `head`, `value_dim`, `neuron`)."""
        return cls(
            alpha=coefficients["head"],
            beta=coefficients["value_dim"],
            gamma=coefficients["neuron"],
            static=coefficients["static"],
            unit=unit,
        )


def unit_costs(spec: ViTSpec, attention_matmuls: bool = True) -> UnitCosts:
    n, d, dh = spec.num_tokens, spec.embed_dim, spec.head_dim
    quad = n * n if attention_matmuls else 0
    return UnitCosts(alpha=2 * n * d * dh + quad * dh, beta=2 * n * d + quad, gamma=2 * n * d, static=static_macs(spec))


def static_macs(spec: ViTSpec) -> int:
    """Cost no gate can remove: patch embedding and classifier."""
    ph, pw = spec.patch_size
    return spec.num_patches * spec.embed_dim * spec.in_chans * ph * pw + spec.embed_dim * spec.num_classes


def layer_cost(spec: ViTSpec, layer: LayerSpec, costs: UnitCosts):
    """`alpha * heads + beta * value dims + gamma * neurons` of one block. A head whose Q/K are narrowed to
    `qk_dim` costs `alpha * qk_dim / head_dim`: alpha is linear in the Q/K width (exact for MACs)."""
    heads = costs.alpha * len(layer.heads)
    if layer.qk_dim is not None:
        heads = heads * layer.qk_dim // spec.head_dim if isinstance(heads, int) else heads * layer.qk_dim / spec.head_dim
    return heads + costs.beta * sum(layer.value_dims) + costs.gamma * (layer.mlp_hidden or 0)


def spec_cost(spec: ViTSpec, costs: UnitCosts):
    """`static + sum alpha * heads + beta * value dims + gamma * neurons` of an architecture."""
    return costs.static + sum(layer_cost(spec, layer, costs) for layer in spec.layers)


def spec_macs(spec: ViTSpec, attention_matmuls: bool = True) -> int:
    return spec_cost(spec, unit_costs(spec, attention_matmuls))


def dense_prunable_macs(spec: ViTSpec, attention_matmuls: bool = True) -> int:
    """Prunable MACs of the dense model: the normaliser of the cost penalties."""
    return spec_macs(spec.dense(), attention_matmuls) - static_macs(spec)


def load_cost_table(path, spec: ViTSpec) -> UnitCosts:
    """The per-unit latency costs measured by `hiap_core.measure.cost_table` for this architecture (milliseconds)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"latency cost table {path} not found: measure one with "
            f"`python -m hiap_core.measure.cost_table --out {path}` (or `dvc repro cost_table`)"
        )
    try:
        table = json.loads(path.read_text())
        measured = ViTSpec.from_dict(table["spec"])
        costs = UnitCosts.from_coefficients(table["coefficients"], table["unit"])
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"latency cost table {path} has no valid {err} entry: not a table written by hiap_core.measure.cost_table; "
            f"measure one with `python -m hiap_core.measure.cost_table --out {path}`"
        ) from err
    values = {"static": costs.static, "head": costs.alpha, "value_dim": costs.beta, "neuron": costs.gamma}
    bad = {k: v for k, v in values.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)}
    if bad or costs.alpha + costs.beta + costs.gamma == 0:
        raise ValueError(
            f"latency cost table {path}: coefficients must be finite numbers >= 0 and some unit must cost more than 0, "
            f"got {bad or values}; measure the table again"
        )
    if measured.dense() != spec.dense():
        raise ValueError(
            f"latency cost table {path} was measured for another architecture "
            f"({measured.embed_dim}-dim, {len(measured.layers)} layers, {measured.num_tokens} tokens): "
            "measure one for this model"
        )
    return costs


def count_macs(model: nn.Module | ViTSpec, img_size=None, attention_matmuls: bool = True) -> int:
    """Analytic MACs per image of a dense timm ViT, a gated ViT (hardened state) or a `PrunedViT`."""
    spec = model if isinstance(model, ViTSpec) else describe(model)
    if img_size is not None:
        spec = spec.with_img_size(img_size)
    return spec_macs(spec, attention_matmuls)


@dataclass
class ExpectedCost:
    """Differentiable expected cost of a gated ViT under its gate probabilities (tensors)."""

    macro: torch.Tensor  # sum alpha * p(g)
    micro: torch.Tensor  # sum beta * p(g) * p(d) + gamma * p(b) * p(c)
    static: float
    dense_prunable: float

    @property
    def total(self) -> torch.Tensor:
        return self.static + self.macro + self.micro


def expected_cost(gated: nn.Module, costs: UnitCosts, dense_prunable: float | None = None) -> ExpectedCost:
    """`sum alpha p(g) + sum beta p(g) p(d) + sum gamma p(b) p(c)` plus static (hiap_core/DESIGN.md), for
    MACs or latency unit costs alike. `dense_prunable` (fixed for a model) is computed when not given.

    Exactly the expectation of the linear cost `sum alpha g + beta g d + gamma b c`. The hard cost also
    removes a head whose gate is open but whose value dims are all closed, so
    E[hard] = expected - sum alpha p(g) prod_j (1 - p(d_j)): negligible unless a head is nearly empty.
    """
    macro = micro = 0
    for attn, mlp in gated_blocks(gated):
        p_head = attn.head_gate.probs()
        p_value = attn.value_gate.probs().view(attn.num_heads, attn.head_dim)
        macro = macro + costs.alpha * p_head.sum()
        micro = (
            micro
            + costs.beta * (p_head * p_value.sum(dim=1)).sum()
            + costs.gamma * mlp.block_gate.probs()[0] * mlp.neuron_gate.probs().sum()
        )
    if dense_prunable is None:
        dense_prunable = spec_cost(describe(gated).dense(), costs) - costs.static
    return ExpectedCost(macro, micro, costs.static, dense_prunable)


def expected_macs(gated: nn.Module, attention_matmuls: bool = True) -> ExpectedCost:
    return expected_cost(gated, unit_costs(describe(gated), attention_matmuls))
