"""HiAP: hierarchical auto-pruning of timm Vision Transformers (gates, exact MACs, losses, extraction)."""

from . import torchvision_compat  # noqa: F401  (must run before anything imports timm)
from .arch import LayerSpec, ViTSpec, count_params, describe
from .cost import (
    ExpectedCost,
    UnitCosts,
    count_macs,
    dense_prunable_macs,
    expected_cost,
    expected_macs,
    load_cost_table,
    spec_cost,
    unit_costs,
)
from .export import export_onnx, export_program
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
    "ExpectedCost", "GatedAttention", "GatedMlp", "GumbelSigmoidGate", "LayerSpec", "PrunedViT", "UnitCosts",
    "ViTSpec", "cost_penalties", "count_macs", "count_params", "dense_prunable_macs", "describe",
    "expected_cost", "expected_macs", "export_onnx", "export_program", "extract", "feasibility_penalty", "gate_parameters", "gate_vit", "gated_blocks",
    "hard_gate_state", "kd_loss", "load_cost_table", "load_pruned", "save_pruned", "set_fused_attention", "set_gate_state",
    "set_temperature", "spec_cost", "structure_summary", "temperature_at", "unit_costs",
]
