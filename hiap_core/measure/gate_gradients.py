"""Per-logit gradients of the task loss and of each penalty at the start of HiAP's search.

Whether a penalty ratio drops heads or thins value dims is decided by these gradients: a gate logit
`a` falls while `d task/da + s (lambda_macro dL_macro/da + lambda_micro dL_micro/da) + lambda_feas
dL_feas/da > 0` (`s`: the budget controller's penalty scale). The task term is the mean over batches of
the straight-through gradient of the KD loss; the penalty terms are exact.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from ..core.cost import expected_cost
from ..core.gated_vit import gated_blocks
from ..core.losses import cost_penalties, feasibility_penalty
from ..train.config import config_from_params
from ..train.data import build_loaders
from ..train.models import build_model, load_teacher
from ..train.objective import step_loss
from ..train.pruning import make_pruner

KINDS = ("head", "value", "block", "neuron")  # macro (head, FFN block) and micro (value dim, neuron) gates


def _logits_by_kind(model) -> list[tuple[int, str, torch.Tensor]]:
    return [
        (layer, kind, gate.logits)
        for layer, (attn, mlp) in enumerate(gated_blocks(model))
        for kind, gate in zip(KINDS, (attn.head_gate, attn.value_gate, mlp.block_gate, mlp.neuron_gate))
    ]


def gate_gradients(params: dict, teacher: str | Path, batches: int = 16, seed: int = 0) -> pd.DataFrame:
    """One row per gate unit (`layer`, `kind`, `unit`) with `task`, `macro`, `micro` and `feas`: d term /
    d logit for the teacher gated as HiAP's search starts (`hiap` settings of `params`, logits at
    `init_logit`, temperature `tau0`), the task gradient averaged over `batches` training batches."""
    cfg = config_from_params(params, "hiap", {"teacher": str(teacher), "seed": seed})
    train_loader = build_loaders(cfg.data, cfg.model.img_size, cfg.optim.batch_size, seed).train
    teacher_model = load_teacher(cfg).eval()
    torch.manual_seed(seed)
    pruner = make_pruner(cfg, build_model(cfg, teacher_model), total_steps=1)
    model = pruner.model.train()
    named = _logits_by_kind(model)
    logits = [logit for _, _, logit in named]
    macro, micro = cost_penalties(expected_cost(model, pruner.costs, pruner.dense_prunable))
    terms = {
        "macro": macro,
        "micro": micro,
        "feas": feasibility_penalty(model, *pruner.minimums),
    }
    grads = {name: torch.autograd.grad(term, logits, allow_unused=True, retain_graph=True) for name, term in terms.items()}
    task = [torch.zeros_like(logit) for logit in logits]
    for _, (x, y) in zip(range(batches), train_loader):
        for total, grad in zip(task, torch.autograd.grad(step_loss(model, x, y, cfg, teacher_model)["task"], logits)):
            total += grad / batches
    grads["task"] = task
    frames = []
    for i, (layer, kind, logit) in enumerate(named):
        columns = {name: (torch.zeros_like(logit) if grads[name][i] is None else grads[name][i]) for name in grads}
        frame = pd.DataFrame({name: grad.detach().numpy() for name, grad in columns.items()})
        frames.append(frame.assign(layer=layer, kind=kind, unit=range(logit.numel())))
    return pd.concat(frames, ignore_index=True)[["layer", "kind", "unit", "task", "macro", "micro", "feas"]]


def net_push(gradients: pd.DataFrame, lambda_macro: float, lambda_micro: float, lambda_feas: float, scale: float) -> pd.Series:
    """d loss / d logit per unit of `gate_gradients` for a penalty ratio at penalty scale `scale`:
    positive closes the unit, negative keeps it open."""
    penalty = scale * (lambda_macro * gradients["macro"] + lambda_micro * gradients["micro"])
    return gradients["task"] + penalty + lambda_feas * gradients["feas"]
