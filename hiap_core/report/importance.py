"""Does the search close what matters least? Each HiAP run's `closing.csv` (the step every gated unit
closed at, `Pruner.closing_steps`) against the unit's L1 importance on the teacher (the scores the
`uniform` and `l1_ffn` baselines rank by): a Spearman rank correlation per unit kind. Positive: the less
important a unit, the earlier the search gave it up; about 0: the order is blind to importance."""

from __future__ import annotations

import pandas as pd
import torch
from scipy import stats

from ..core.baselines import neuron_scores, value_dim_scores
from ..core.gated_vit import gate_vit, gated_blocks
from ..train.config import config_from_params
from ..train.models import build_model, load_teacher
from ..train.paths import RUNS
from ..train.runs import run_metrics
from ..train.search_levers import freeze_figures


def teacher_scores(teacher: torch.nn.Module) -> pd.DataFrame:
    """(layer, kind, index, importance) of every value dim and FFN neuron of the dense `teacher`."""
    rows = []
    for layer, (attn, mlp) in enumerate(gated_blocks(gate_vit(teacher))):
        for kind, scores in (("value_dim", value_dim_scores(attn).flatten()), ("neuron", neuron_scores(mlp))):
            rows.extend({"layer": layer, "kind": kind, "index": i, "importance": float(s)} for i, s in enumerate(scores))
    return pd.DataFrame(rows)


def closing_vs_importance(closing: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """Per unit kind: units, how many the search closed, and Spearman's rho (with its p-value) between a
    unit's importance and how long it was kept (its closing step; a unit open at the end counts as kept
    past the last step)."""
    units = closing.merge(scores, on=["layer", "kind", "index"])
    kept_until = units["closed_step"].where(units["closed_step"] >= 0, units["closed_step"].max() + 1)
    rows = []
    for kind, group in units.assign(kept_until=kept_until).groupby("kind", sort=False):
        rho, p = stats.spearmanr(group["importance"], group["kept_until"])
        rows.append({"kind": kind, "units": len(group), "closed": int((group["closed_step"] >= 0).sum()), "rho": rho, "p": p})
    return pd.DataFrame(rows)


def dense_teacher(params: dict) -> torch.nn.Module:
    """The study's teacher (`data/runs/dense`) as the dense timm ViT it was trained as."""
    cfg = config_from_params(params, "finetune", {"teacher": str(RUNS / "dense")})
    return build_model(cfg, load_teacher(cfg)).eval()


def _quartiles(values: list[float] | None) -> str:
    return "none" if values is None else " / ".join(f"{v:.2f}" for v in values)


def search_table(names: list[str], scores: pd.DataFrame) -> pd.DataFrame:
    """Per HiAP run, at the freeze (`search_levers.freeze_figures`): the cost-weighted disagreement of the gates with
    their hardened state (D, and its open and closed sides), the share of the gated cost at |logit| < 1, the
    quartiles of the open and the closed logits (`core/polarisation.py`), where the controller left the cost
    against the target, the units the quotas gave back and the rounding flipped (and their share of all gated
    units), the targets missed; then the largest penalty scale and Spearman's rho of importance vs the step each
    neuron and value dim closed."""
    rows = []
    for name in names:
        metrics = run_metrics(name)
        frozen = metrics["structure"]["at_freeze"]
        rho = closing_vs_importance(pd.read_csv(RUNS / name / "closing.csv"), scores).set_index("kind")["rho"]
        rows.append(
            {
                "run": name,
                "target_fraction": metrics["budget"]["target_fraction"],
                **freeze_figures(metrics),
                "open_logit_quartiles": _quartiles(frozen["open_logit_quartiles"]),
                "closed_logit_quartiles": _quartiles(frozen["closed_logit_quartiles"]),
                "max_penalty_scale": metrics["budget"]["max_penalty_scale"],
                "rho_neurons": rho.get("neuron"),
                "rho_value_dims": rho.get("value_dim"),
            }
        )
    return pd.DataFrame(rows)
