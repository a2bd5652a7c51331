"""HiAP: hierarchical auto-pruning of timm Vision Transformers.

`hiap_core` re-exports the core library (`hiap_core.core`: gates, exact MACs, losses, extraction,
`Pruner`). The study built on it lives in `hiap_core.train` (config, data, training engine),
`hiap_core.measure` (timing, latency cost table, benchmarks) and `hiap_core.report` (tables, figures).
Design notes: hiap_core/DESIGN.md.
"""

from .core import torchvision_compat  # noqa: F401  (must run before anything imports timm)
from .core.baselines import prune_to_target
from .core.budget import BudgetController, round_to_budget
from .core.cost import (
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
from .core.describe import describe
from .core.export import export_onnx, export_program
from .core.extract import extract, structure_summary
from .core.gated_vit import (
    GatedAttention,
    GatedMlp,
    check_vit,
    gate_parameters,
    gate_vit,
    gated_blocks,
    hard_gate_state,
    set_gate_state,
    set_temperature,
)
from .core.gates import GumbelSigmoidGate
from .core.losses import cost_penalties, feasibility_penalty, kd_loss, temperature_at
from .core.inference import InferenceModel, optimize_for_inference
from .core.models import cifar_vit_tiny
from .core.pruned import (
    PrunedViT,
    count_params,
    load_pruned,
    load_spec,
    save_pruned,
    set_fused_attention,
    set_padded_attention,
)
from .core.pruner import Pruner, param_groups
from .core.quotas import Quotas, quota_shortfalls, restore_quotas
from .core.spec import LayerSpec, ViTSpec

__all__ = [
    "BudgetController",
    "ExpectedCost",
    "GatedAttention",
    "GatedMlp",
    "GumbelSigmoidGate",
    "InferenceModel",
    "LayerSpec",
    "PrunedViT",
    "Pruner",
    "Quotas",
    "UnitCosts",
    "ViTSpec",
    "check_vit",
    "cifar_vit_tiny",
    "cost_penalties",
    "count_macs",
    "count_params",
    "dense_prunable_macs",
    "describe",
    "expected_cost",
    "expected_macs",
    "export_onnx",
    "export_program",
    "extract",
    "feasibility_penalty",
    "gate_parameters",
    "gate_vit",
    "gated_blocks",
    "hard_gate_state",
    "kd_loss",
    "load_cost_table",
    "load_pruned",
    "load_spec",
    "optimize_for_inference",
    "param_groups",
    "prune_to_target",
    "quota_shortfalls",
    "restore_quotas",
    "round_to_budget",
    "save_pruned",
    "set_fused_attention",
    "set_gate_state",
    "set_padded_attention",
    "set_temperature",
    "spec_cost",
    "structure_summary",
    "temperature_at",
    "unit_costs",
]
