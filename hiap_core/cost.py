"""Exact MACs (DESIGN.md, "MACs"): every Linear/Conv plus the two attention matmuls; norms,
activations, softmax, biases and adds count 0. Batch size 1."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .arch import ViTSpec, describe


@dataclass(frozen=True)
class UnitCosts:
    """Marginal MACs of one prunable unit in one block (identical for every block of a plain ViT)."""

    alpha: int  # per live head: Q and K projections (+ q k^T)
    beta: int  # per live value dim: V projection and proj column (+ attn v)
    gamma: int  # per live FFN neuron: fc1 row and fc2 column


def unit_costs(spec: ViTSpec, attention_matmuls: bool = True) -> UnitCosts:
    n, d, dh = spec.num_tokens, spec.embed_dim, spec.head_dim
    quad = n * n if attention_matmuls else 0
    return UnitCosts(alpha=2 * n * d * dh + quad * dh, beta=2 * n * d + quad, gamma=2 * n * d)


def static_macs(spec: ViTSpec) -> int:
    """Cost no gate can remove: patch embedding and classifier."""
    ph, pw = spec.patch_size
    return spec.num_patches * spec.embed_dim * spec.in_chans * ph * pw + spec.embed_dim * spec.num_classes


def spec_macs(spec: ViTSpec, attention_matmuls: bool = True) -> int:
    c = unit_costs(spec, attention_matmuls)
    prunable = sum(
        c.alpha * len(layer.heads) + c.beta * sum(layer.value_dims) + c.gamma * (layer.mlp_hidden or 0) for layer in spec.layers
    )
    return static_macs(spec) + prunable


def dense_prunable_macs(spec: ViTSpec, attention_matmuls: bool = True) -> int:
    """Prunable MACs of the dense model: the normaliser of the cost penalties."""
    return spec_macs(spec.dense(), attention_matmuls) - static_macs(spec)


def count_macs(model: nn.Module | ViTSpec, img_size=None, attention_matmuls: bool = True) -> int:
    """Analytic MACs per image of a dense timm ViT, a gated ViT (hardened state) or a `PrunedViT`."""
    spec = model if isinstance(model, ViTSpec) else describe(model)
    if img_size is not None:
        spec = spec.with_img_size(img_size)
    return spec_macs(spec, attention_matmuls)


@dataclass
class ExpectedMacs:
    """Differentiable expected MACs of a gated ViT under its gate probabilities (tensors)."""

    macro: torch.Tensor  # sum alpha * p(g)
    micro: torch.Tensor  # sum beta * p(g) * p(d) + gamma * p(b) * p(c)
    static: int
    dense_prunable: int

    @property
    def total(self) -> torch.Tensor:
        return self.static + self.macro + self.micro


def expected_macs(gated: nn.Module, attention_matmuls: bool = True) -> ExpectedMacs:
    """`sum alpha p(g) + sum beta p(g) p(d) + sum gamma p(b) p(c)` plus static (DESIGN.md).

    Exactly the expectation of the linear cost `sum alpha g + beta g d + gamma b c`. The hard cost also
    removes a head whose gate is open but whose value dims are all closed, so
    E[hard] = expected - sum alpha p(g) prod_j (1 - p(d_j)): negligible unless a head is nearly empty.
    """
    from .gated_vit import gated_blocks

    blocks = gated_blocks(gated)
    spec = describe(gated)
    c = unit_costs(spec, attention_matmuls)
    macro = micro = 0
    for attn, mlp in blocks:
        p_head = attn.head_gate.probs()
        p_value = attn.value_gate.probs().view(attn.num_heads, attn.head_dim)
        macro = macro + c.alpha * p_head.sum()
        micro = micro + c.beta * (p_head * p_value.sum(dim=1)).sum() + c.gamma * mlp.block_gate.probs()[0] * mlp.neuron_gate.probs().sum()
    return ExpectedMacs(macro, micro, static_macs(spec), dense_prunable_macs(spec, attention_matmuls))
