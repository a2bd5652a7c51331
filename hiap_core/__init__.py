"""HiAP: hierarchical auto-pruning of timm Vision Transformers (gates, exact MACs, losses, extraction)."""

from . import torchvision_compat  # noqa: F401  (must run before anything imports timm)
from .arch import LayerSpec, ViTSpec, count_params, describe
from .cost import ExpectedMacs, UnitCosts, count_macs, dense_prunable_macs, expected_macs, unit_costs
from .extract import extract, structure_summary
from .gated_vit import (
    GatedAttention,
    GatedMlp,
    gate_parameters,
    gate_vit,
    gated_blocks,
    hard_gate_state,
    set_gate_state,
    set_temperature,
)
from .gates import GumbelSigmoidGate
from .losses import cost_penalties, feasibility_penalty, kd_loss, temperature_at
from .pruned import PrunedViT, load_pruned, save_pruned, set_fused_attention

__all__ = [
    "ExpectedMacs", "GatedAttention", "GatedMlp", "GumbelSigmoidGate", "LayerSpec", "PrunedViT", "UnitCosts",
    "ViTSpec", "cost_penalties", "count_macs", "count_params", "dense_prunable_macs", "describe",
    "expected_macs", "extract", "feasibility_penalty", "gate_parameters", "gate_vit", "gated_blocks",
    "hard_gate_state", "kd_loss", "load_pruned", "save_pruned", "set_fused_attention", "set_gate_state",
    "set_temperature", "structure_summary", "temperature_at", "unit_costs",
]
