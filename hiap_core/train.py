"""One training engine for dense, HiAP and baseline runs; resumable, DDP-ready.

    python -m hiap_core.train --params params.yaml --method hiap --out runs/hiap --set hiap.lambda_macro=4
    torchrun --nproc_per_node=2 -m hiap_core.train ...   (gloo on CPU, nccl on GPU)

Writes into `--out`: `checkpoint.pt` (every epoch, atomic; rerunning the same command resumes),
`history.csv` (per epoch: accuracy, loss terms, temperature, expected and hard MACs), `gates.csv` (tidy
gate state per epoch and layer), `budget.csv` (budget-exact mode: penalty scale, target and hardened
cost per step), `metrics.json` (final, for `dvc metrics show`) and `model/` (the extracted model,
`load_pruned`-able).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import torchvision_compat  # noqa: F401  (before timm)
from .baselines import prune_to_target
from .arch import describe
from .budget import BudgetController, budget_step, finish_budget, minimum_cost
from .config import ConfigError, RunConfig, config_from_params
from .cost import UnitCosts, count_macs, expected_cost, expected_macs, load_cost_table, spec_cost, unit_costs
from .data import DatasetError, build_loaders
from .extract import extract, structure_summary
from .files import atomic_write
from .gated_vit import gate_parameters, gate_vit, set_temperature
from .losses import cost_penalties, feasibility_penalty, kd_loss, temperature_at
from .pruned import load_pruned, save_pruned


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()


def setup_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, torch.device(f"cuda:{local}" if cuda else "cpu"))


def build_dense_model(cfg: RunConfig) -> nn.Module:
    """The dense timm ViT of the config: random init, or `model.pretrained` (a checkpoint file or "hub")."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    m = cfg.model
    if m.name == "custom":
        model = VisionTransformer(img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans, num_classes=m.num_classes,
                                  embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                                  drop_path_rate=m.drop_path)
    else:
        hub = m.pretrained == "hub"
        try:
            model = timm.create_model(m.name, pretrained=hub, num_classes=m.num_classes, drop_path_rate=m.drop_path,
                                      img_size=m.img_size)
        except Exception as err:
            if not hub:
                raise
            raise ConfigError(
                f"model.pretrained = 'hub': could not download {m.name} weights ({type(err).__name__}); offline, "
                "set model.pretrained to a local checkpoint file"
            ) from err
    if m.pretrained and m.pretrained != "hub":
        path = Path(m.pretrained)
        if not path.is_file():
            raise ConfigError(f"model.pretrained = {m.pretrained!r}: file not found. Download the {m.name} weights "
                              "(timm checkpoint, .pth or .safetensors) and point model.pretrained at them")
        timm.models.load_checkpoint(model, str(path), strict=True)
    return model


def load_teacher(cfg: RunConfig) -> nn.Module:
    """The dense teacher: the dense run's saved model, or the pretrained checkpoint."""
    if cfg.teacher is None:
        return build_dense_model(cfg).eval()
    folder = Path(cfg.teacher) / "model"
    if not folder.is_dir():
        raise ConfigError(f"teacher = {cfg.teacher!r}: {folder} not found; run the dense stage first (method dense)")
    return load_pruned(folder)


def build_model(cfg: RunConfig, teacher: nn.Module | None) -> nn.Module:
    if cfg.method == "dense":
        return build_dense_model(cfg)
    dense = build_dense_model(cfg) if cfg.teacher is not None else copy.deepcopy(teacher)
    if cfg.teacher is not None:
        try:
            dense.load_state_dict(teacher.state_dict())
        except RuntimeError as err:
            raise ConfigError(f"teacher = {cfg.teacher!r} does not match the model config: {str(err).splitlines()[0]}") from err
    if cfg.method == "hiap":
        return gate_vit(dense, init_logit=cfg.hiap.init_logit, tau=cfg.hiap.tau0)
    return prune_to_target(dense.eval(), cfg.method, cfg.target_macs)


def cost_model(cfg: RunConfig, spec) -> UnitCosts:
    """The unit costs the penalties use: MACs, or the measured latency table (`hiap.cost`)."""
    if cfg.hiap.cost == "macs":
        return unit_costs(spec)
    try:
        return load_cost_table(cfg.hiap.cost_table, spec)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ConfigError(f"invalid config: hiap.cost_table = {cfg.hiap.cost_table!r}: {err}") from err


def budget_controller(cfg: RunConfig, spec, costs: UnitCosts) -> BudgetController | None:
    """Budget-exact mode's controller (None in lambda mode); impossible targets are refused here, before training."""
    if not cfg.budget_exact:
        return None
    dense = spec_cost(spec.dense(), costs)
    if cfg.hiap.cost == "latency":
        name, target = "hiap.target_latency", cfg.hiap.target_latency
    else:
        name, target = "target_macs", cfg.target_macs if cfg.target_macs <= 1 else cfg.target_macs / dense
    if target > 1:
        raise ConfigError(f"invalid config: {name} = {cfg.target_macs!r}: above the dense model's {dense:,.0f} MACs; "
                          "a budget must be at most the dense cost")
    floor = minimum_cost(spec.dense(), costs, cfg.hiap.min_heads, cfg.hiap.min_value_fraction) / dense
    if target < floor:
        raise ConfigError(f"invalid config: {name} = {target:.4g} of dense is below {floor:.4g}, the smallest model the "
                          "feasibility minimums allow (hiap.min_heads heads x hiap.min_value_fraction value dims per layer, "
                          "no FFN): raise the target or lower those minimums")
    return BudgetController(target, cfg.hiap.budget_lr, cfg.hiap.budget_ramp, cfg.hiap.budget_gain)


def param_groups(model: nn.Module, cfg: RunConfig) -> list[dict]:
    """Weight decay on matrices only; gate logits get their own learning rate and no decay."""
    gates = {id(p) for p in gate_parameters(model)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) in gates or not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.split(".")[-1] in ("pos_embed", "cls_token", "reg_token")
        (no_decay if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay, "base_lr": cfg.optim.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.optim.lr},
    ]
    if gates:
        groups.append({"params": gate_parameters(model), "weight_decay": 0.0, "base_lr": cfg.optim.gate_lr})
    return groups


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + 0.5 * (1 - min_ratio) * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def evaluate(model: nn.Module, loader, dist: Dist) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) over the whole test set (summed over ranks)."""
    was_training = model.training
    model.eval()
    correct = loss = count = 0.0
    for x, y in loader:
        x, y = x.to(dist.device), y.to(dist.device)
        logits = model(x)
        correct += float((logits.argmax(dim=1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        count += len(y)
    model.train(was_training)
    correct, loss, count = dist.all_sum([correct, loss, count])
    return correct / count, loss / count


def _write_reports(out: Path, history: list[dict], gate_rows: list[dict], budget_rows: list[dict]) -> None:
    atomic_write(out / "history.csv", lambda p: pd.DataFrame(history).to_csv(p, index=False))
    if gate_rows:
        atomic_write(out / "gates.csv", lambda p: pd.DataFrame(gate_rows).to_csv(p, index=False))
    if budget_rows:
        atomic_write(out / "budget.csv", lambda p: pd.DataFrame(budget_rows).to_csv(p, index=False))


def gate_rows_for(model: nn.Module, epoch: int) -> list[dict]:
    table = structure_summary(model).iloc[:-1]
    rows = table.drop(columns=["macs", "macs_no_attn_matmul", "params"]).to_dict("records")
    for row in rows:
        row["epoch"] = epoch
        row["value_dims"] = " ".join(map(str, row["value_dims"]))
    return rows


class Trainer:
    def __init__(self, cfg: RunConfig, dist: Dist | None = None, restart_on_config_change: bool = False):
        """`restart_on_config_change`: a checkpoint written with another config is discarded (pipelines whose
        params changed) instead of refused (a mistyped --out)."""
        self.cfg = cfg.validate()
        self.restart_on_config_change = restart_on_config_change
        self.dist = dist or setup_distributed()
        self.out = Path(cfg.out)
        self.show = cfg.progress and self.dist.main and not os.environ.get("CI")
        self.budget = None

    def prepare_costs(self, gated: nn.Module) -> None:
        """Unit costs of the penalties and, in budget-exact mode, the controller (refusing impossible targets)."""
        spec = describe(gated)
        self.costs = cost_model(self.cfg, spec)
        self.dense_cost = spec_cost(spec.dense(), self.costs)
        self.budget = budget_controller(self.cfg, spec, self.costs)

    def _log(self, message: str) -> None:
        if self.dist.main:
            print(message, flush=True)

    def run(self) -> dict:
        cfg, dist = self.cfg, self.dist
        torch.manual_seed(cfg.seed)
        train_loader, test_loader, num_classes = build_loaders(
            cfg.data, cfg.model.img_size, cfg.optim.batch_size, cfg.seed, dist.rank, dist.world
        )
        if num_classes != cfg.model.num_classes:
            raise ConfigError(f"invalid config: model.num_classes = {cfg.model.num_classes}, but {cfg.data.dataset} has {num_classes} classes")
        teacher = None if cfg.method == "dense" else load_teacher(cfg).to(dist.device).eval()
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, teacher).to(dist.device)
        gated = cfg.method == "hiap"
        if gated:
            self.prepare_costs(model)
        optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr)
        steps_per_epoch = len(train_loader)
        total_steps = cfg.optim.epochs * steps_per_epoch
        warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)

        start_epoch, history, gate_rows, self.budget_rows = 0, [], [], []
        checkpoint = self.out / "checkpoint.pt"
        state = torch.load(checkpoint, map_location=dist.device, weights_only=False) if checkpoint.is_file() else None
        if state is not None:
            saved = {k: v for k, v in state["config"].items() if k not in ("out", "progress")}
            now = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "progress")}
            changed = sorted(k for k in now if saved.get(k) != now[k])
            if changed and not self.restart_on_config_change:
                raise ConfigError(f"{checkpoint} was written with a different config ({', '.join(changed)}): "
                                  "use another --out or delete the folder to start over")
            if changed:
                self._log(f"{checkpoint} has another config ({', '.join(changed)}): starting over")
                state = None
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, history, gate_rows = state["epoch"], state["history"], state["gate_rows"]
            if self.budget is not None:
                self.budget.load_state_dict(state["budget"])
                self.budget_rows = state["budget_rows"]
            self._log(f"resuming {self.out} at epoch {start_epoch}/{cfg.optim.epochs}")
        elif gated and dist.main:
            gate_rows = gate_rows_for(model, 0)
        net = model
        if dist.world > 1:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        self.out.mkdir(parents=True, exist_ok=True)

        for epoch in range(start_epoch, cfg.optim.epochs):
            t0 = time.perf_counter()
            train_loader.set_epoch(epoch)
            net.train()
            sums = {}
            batches = tqdm(train_loader, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.optim.epochs}", disable=not self.show, leave=False)
            for i, (x, y) in enumerate(batches):
                step = epoch * steps_per_epoch + i
                torch.manual_seed(cfg.seed * 1_000_003 + step)  # gate noise and dropout: same on every rank, resumable
                factor = lr_factor(step, total_steps, warmup, cfg.optim.min_lr / cfg.optim.lr)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                tau = temperature_at(step, total_steps, cfg.hiap.tau0, cfg.hiap.tau_min)
                if gated:
                    set_temperature(model, tau)
                x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
                terms = self._loss(net, model, teacher, x, y)
                loss = terms["loss"]
                if not torch.isfinite(loss):
                    kept = f"the last good checkpoint {checkpoint} is kept" if checkpoint.is_file() else "no checkpoint was written yet"
                    raise TrainingDiverged(f"non-finite loss at epoch {epoch + 1}, step {i} "
                                           f"({', '.join(f'{k}={float(v.detach()):.4g}' for k, v in terms.items())}); {kept}. "
                                           "Lower optim.lr or the lambdas.")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                if self.budget is not None:
                    self._budget_step(model, step, total_steps)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                if self.show:
                    batches.set_postfix(loss=f"{float(loss):.3f}")
            train_time = time.perf_counter() - t0
            acc, test_loss = evaluate(model, test_loader, dist)
            row = {"epoch": epoch + 1, **{f"train_{k}": v / steps_per_epoch for k, v in sums.items()},
                   "test_acc": acc, "test_loss": test_loss, "lr": optimizer.param_groups[0]["lr"],
                   "steps_per_epoch": steps_per_epoch, "epoch_time_s": train_time, "train_images_per_s": steps_per_epoch * cfg.optim.batch_size / train_time}
            if gated:
                exp = expected_macs(model)
                row.update(tau=tau, expected_macs=float(exp.total.detach()), hard_macs=count_macs(model),
                           penalty_scale=self.budget.scale if self.budget is not None else 1.0)
                gate_rows = gate_rows + gate_rows_for(model, epoch + 1)
            history = history + [row]
            self._log(f"[{cfg.method}] epoch {epoch + 1}/{cfg.optim.epochs} loss {row['train_loss']:.4f} "
                      f"acc {acc:.4f}" + (f" tau {tau:.3f} MACs {row['hard_macs'] / 1e6:.1f}M" if gated else "")
                      + f" ({train_time:.0f}s)")
            if dist.main:
                state = {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "history": history, "gate_rows": gate_rows, "config": cfg.to_dict(),
                         "rng": torch.get_rng_state()}
                if self.budget is not None:
                    state.update(budget=self.budget.state_dict(), budget_rows=self.budget_rows)
                atomic_write(checkpoint, lambda p: torch.save(state, p))
                _write_reports(self.out, history, gate_rows, self.budget_rows)
        return self._finish(model, test_loader, history)

    def _loss(self, net, model, teacher, x, y) -> dict:
        cfg = self.cfg
        logits = net(x)
        if teacher is None:
            task = F.cross_entropy(logits, y, label_smoothing=cfg.optim.label_smoothing)
            return {"loss": task, "task": task}
        with torch.no_grad():
            teacher_logits = teacher(x)
        task = kd_loss(logits, teacher_logits, y, cfg.hiap.kd_alpha, cfg.hiap.kd_temperature, cfg.optim.label_smoothing)
        if cfg.method != "hiap":
            return {"loss": task, "task": task}
        macro, micro = cost_penalties(expected_cost(model, self.costs))
        feas = feasibility_penalty(model, cfg.hiap.min_heads, cfg.hiap.min_value_fraction, cfg.hiap.min_neuron_fraction)
        scale = self.budget.scale if self.budget is not None else 1.0
        loss = task + scale * (cfg.hiap.lambda_macro * macro + cfg.hiap.lambda_micro * micro) + cfg.hiap.lambda_feas * feas
        return {"loss": loss, "task": task, "macro": macro.detach(), "micro": micro.detach(), "feas": feas.detach()}

    def _budget_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Budget-exact mode: adapt the penalty scale to the cost after this step's update."""
        row = budget_step(self.budget, model, self.costs, self.dense_cost, (step + 1) / total_steps)
        scale, hiap = row["penalty_scale"], self.cfg.hiap
        self.budget_rows.append({"step": step + 1, **row, "lambda_macro": scale * hiap.lambda_macro, "lambda_micro": scale * hiap.lambda_micro})

    def _finish(self, model: nn.Module, test_loader, history: list[dict]) -> dict:
        """Extract (HiAP), evaluate the final plain model, save it, write metrics.json. Idempotent."""
        cfg, dist = self.cfg, self.dist
        model.eval()
        budget = {}
        if self.budget is not None:
            budget = {"cost": cfg.hiap.cost, **finish_budget(self.budget, model, self.costs, self.dense_cost,
                                                            cfg.hiap.budget_tolerance, cfg.hiap.min_heads)}
        if cfg.method == "hiap":
            final = extract(model)
        elif cfg.method == "dense":
            final = extract(gate_vit(copy.deepcopy(model)))  # the same weights as a plain PrunedViT
        else:
            final = model
        acc, test_loss = evaluate(final, test_loader, dist)
        dense_macs = count_macs(final.spec.dense())
        metrics = {
            "method": cfg.method,
            "target_macs": cfg.target_macs,
            "test_acc": acc,
            "test_loss": test_loss,
            "macs": count_macs(final),
            "macs_no_attn_matmul": count_macs(final, attention_matmuls=False),
            "dense_macs": dense_macs,
            "macs_fraction": count_macs(final) / dense_macs,
            "reduction_pct": 100 * (1 - count_macs(final) / dense_macs),
            "params": sum(p.numel() for p in final.parameters()),
            "epochs": cfg.optim.epochs,
            "train_time_s": sum(r["epoch_time_s"] for r in history),
            **({"budget": budget} if budget else {}),
        }
        if dist.main:
            save_pruned(final, self.out / "model")
            atomic_write(self.out / "summary.csv", lambda p: structure_summary(final).to_csv(p, index=False))
            atomic_write(self.out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2)))
            self._log(f"[{cfg.method}] final: acc {acc:.4f}, {metrics['macs'] / 1e6:.2f}M MACs "
                      f"({metrics['reduction_pct']:.1f}% cut), {metrics['params'] / 1e6:.3f}M params -> {self.out}")
        return metrics


def train(cfg: RunConfig) -> dict:
    """Run (or resume) one training run; returns the final metrics."""
    return Trainer(cfg).run()


RUNS = Path("data/runs")  # the study's run folders (DVC outputs)
REPORT_METRICS = Path("reports/metrics")


def study_run(params: dict, method: str, name: str, overrides: dict | None = None) -> dict:
    """One run of the study (a DVC stage): train or resume `data/runs/<name>`, restarting it when its
    params changed, and copy its metrics, history and gate states to `reports/metrics/<name>*`."""
    cfg = config_from_params(params, method, {"out": str(RUNS / name), **(overrides or {})})
    metrics = Trainer(cfg, restart_on_config_change=True).run()
    REPORT_METRICS.mkdir(parents=True, exist_ok=True)
    for source, target in (("metrics.json", f"{name}.json"), ("history.csv", f"{name}_history.csv"),
                           ("gates.csv", f"{name}_gates.csv"), ("budget.csv", f"{name}_budget.csv")):
        if (RUNS / name / source).is_file():
            atomic_write(REPORT_METRICS / target, lambda p, s=source: shutil.copyfile(RUNS / name / s, p))
    return metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train a dense, HiAP or baseline ViT (resumable; torchrun for DDP).")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--method", required=True, help="dense | hiap | uniform | l1_ffn")
    parser.add_argument("--out", required=True, help="run folder (checkpoint, reports, model/)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="overrides, e.g. hiap.lambda_macro=4")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_params(args.params, args.method, [f"out={args.out}", *args.set])
        train(cfg)
    except (ConfigError, DatasetError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
