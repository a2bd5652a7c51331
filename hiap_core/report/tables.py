"""The study's tables: the paper's own numbers, one row per run, the budget-exact comparison; each written
as CSV and markdown to `reports/tables/`."""

from __future__ import annotations

import pandas as pd
from torch import nn

from ..core.baselines import cost_floor
from ..core.budget import minimum_cost
from ..core.cost import count_macs, unit_costs
from ..core.describe import describe
from ..core.files import atomic_write
from ..core.quotas import Quotas
from ..train.config import FLOOR_METHODS
from ..train.paths import REPORTS
from ..train.runs import run_metrics

# The paper's own numbers (DESIGN.md, "Paper facts"): CIFAR-10 ViT-Tiny, Table 3.
PAPER_TABLE3 = pd.DataFrame(
    [
        ("Dense", "-", 174.0, 0.0, 90.50),
        ("Uniform-Ratio", "moderate", 116.6, 33.0, 86.63),
        ("L1-Structured (FFN)", "moderate", 116.5, 33.0, 87.15),
        ("HiAP", "moderate", 116.3, 33.1, 87.56),
        ("L1-Structured (FFN)", "aggressive", 87.3, 49.8, 86.80),
        ("HiAP", "aggressive", 87.1, 49.9, 87.25),
    ],
    columns=["method", "budget", "macs_M", "reduction_pct", "accuracy_pct"],
)
# ImageNet DeiT-S, Table 2: params (M), FLOPs (G), top-1 (%).
PAPER_TABLE2 = pd.DataFrame(
    [
        ("Dense Baseline", 22.1, 4.6, 79.85),
        ("WDPruning", 15.0, 3.1, 78.55),
        ("WDPruning", 13.3, 2.6, 78.38),
        ("S2ViT", 15.3, 3.1, 79.22),
        ("S2ViT", 13.5, 2.8, 78.44),
        ("ViT-Slim", 15.6, 3.1, 79.90),
        ("ViT-Slim", 13.5, 2.8, 79.50),
        ("GOHSP", 14.4, 3.0, 79.98),
        ("GOHSP", 11.1, 2.8, 79.86),
        ("HiAP (paper)", 15.0, 3.1, 79.10),
        ("HiAP (paper)", 12.3, 2.5, 77.95),
    ],
    columns=["method", "params_M", "flops_G", "top1_pct"],
)
METHOD_LABELS = {
    "dense": "Dense",
    "finetune": "Dense + KD fine-tune (control)",
    "uniform": "Uniform-Ratio (every head, full Q/K)",
    "uniform_heads": "Uniform with heads (same heads per layer, one width ratio)",
    "l1_ffn": "L1-Structured (FFN)",
    "torch_pruning": "Torch-Pruning (head dims, L1 group, global)",
    "torch_pruning_heads": "Torch-Pruning (whole heads, L1 group, per layer)",
    "hiap": "HiAP",
    "transplant": "HiAP structure, full baseline fine-tune (transplant)",
    "two_phase": "HiAP structure, post-freeze fine-tune (two-phase at HiAP's compute)",
}


def cost_floors(teacher: nn.Module, hiap: dict) -> dict[str, float]:
    """The smallest MACs fraction each method reaches on the dense `teacher` (its label -> fraction): HiAP's
    under the `hiap` quotas, each baseline's cut (`baselines.cost_floor`); the frontier marks them."""
    spec = describe(teacher)
    quotas = Quotas.of(spec, hiap["min_heads"], hiap["min_value_fraction"], hiap["min_neuron_fraction"])
    floors = {METHOD_LABELS["hiap"]: minimum_cost(spec, unit_costs(spec), quotas) / count_macs(spec)}
    return floors | {METHOD_LABELS[m]: cost_floor(teacher, m) for m in (*FLOOR_METHODS, "uniform_heads")}


def results_table(names: list[str]) -> pd.DataFrame:
    """One row per run: method, MACs (both conventions, millions), reduction, params, accuracy."""
    rows = []
    for name in names:
        m = run_metrics(name)
        rows.append(
            {
                "run": name,
                "method": METHOD_LABELS[m["method"]],
                "macs_M": m["macs"] / 1e6,
                "macs_no_attn_matmul_M": m["macs_no_attn_matmul"] / 1e6,
                "reduction_pct": m["reduction_pct"],
                "params_M": m["params"] / 1e6,
                "accuracy_pct": 100 * m["test_acc"],
            }
        )
    return pd.DataFrame(rows)


def write_table(table: pd.DataFrame, name: str, floatfmt: str = ".2f", csv: bool = True, note: str = "") -> None:
    """`reports/tables/<name>.md` (the table, then `note` in words) and (with `csv`) `<name>.csv`."""
    if csv:
        atomic_write(REPORTS / "tables" / f"{name}.csv", lambda p: table.to_csv(p, index=False))
    text = table.to_markdown(index=False, floatfmt=floatfmt) + "\n" + (f"\n{note}\n" if note else "")
    atomic_write(REPORTS / "tables" / f"{name}.md", lambda p: p.write_text(text))


def budget_table(names: list[str], hiap: dict) -> pd.DataFrame:
    """Each budget-exact run against its target: where it landed before and after rounding, how polarised its
    gates were at the freeze (hardened vs expected cost), the units rounded, the largest and the final
    penalty scale, when its structure settled, and its accuracy."""
    rows = []
    for name in names:
        m = run_metrics(name)
        budget, scale = m["budget"], m["budget"]["final_penalty_scale"]
        rows.append(
            {
                "run": name,
                "cost": budget["cost"],
                "target_fraction": budget["target_fraction"],
                "cost_fraction": budget["cost_fraction"],
                "error_pct": 100 * (budget["cost_fraction"] / budget["target_fraction"] - 1),
                "before_rounding_fraction": budget["cost_fraction_before_rounding"],
                "expected_at_freeze": budget["expected_fraction_at_freeze"],
                "hardened_vs_expected_pct": 100 * budget["hardened_vs_expected_gap"],
                "rounded_units": budget["rounded_units"],
                "max_penalty_scale": budget["max_penalty_scale"],
                "final_lambda_macro": scale * hiap["lambda_macro"],
                "final_lambda_micro": scale * hiap["lambda_micro"],
                "settled_fraction": m["structure"]["settled_fraction"],
                "accuracy_pct": 100 * m["test_acc"],
            }
        )
    return pd.DataFrame(rows)
