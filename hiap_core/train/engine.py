"""One training engine for dense, HiAP and baseline runs; resumable, DDP-ready: the loop, read top to bottom.

    python -m hiap_core.train --params params.yaml --method hiap --out runs/hiap --set hiap.lambda_macro=4
    torchrun --nproc_per_node=2 -m hiap_core.train ...   (gloo on CPU, nccl on GPU)

Writes into `--out` (`run_folder`): `checkpoint.pt` (every epoch, atomic; rerunning the same command resumes),
`history.csv` (per epoch: accuracy, loss terms, temperature, expected and hard MACs), `gates.csv` (tidy
hardened structure per layer every 5 steps of the search, and once frozen), `closing.csv` (the step each
gated unit closed at), `budget.csv` (budget-exact mode: penalty scale, target and hardened cost per
step), `metrics.json` (final, for `dvc metrics show`) and `model/` (the extracted model,
`load_pruned`-able). HiAP itself is `hiap_core.Pruner` (`pruning` makes it); the models come from `models`,
the loss and schedule from `objective`, the device and precision from `device`. This file is the loop
around them: data, resume, epochs, evaluation and the final metrics.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm  # console bars: tqdm.auto warns in kernels without ipywidgets

from ..core.baselines import HEAD_COUNT_METHODS
from ..core.cost import count_macs, expected_macs
from ..core.describe import describe
from ..core.extract import extract
from ..core.gated_vit import gate_parameters, gate_vit
from ..core.pruner import Pruner, param_groups
from ..core.timing import machine
from .config import TRANSPLANTS, ConfigError, RunConfig
from .data import build_loaders, load_teacher_logits
from .device import Dist, autocast, autocast_dtype, setup_distributed, use_tensor_cores
from .models import build_model, load_teacher, teacher_fingerprint
from .objective import lr_factor, step_loss
from .pruning import check_budget, make_pruner
from .run_folder import RunFolder, gate_rows_for, run_inputs


class TrainingDiverged(RuntimeError):
    """The loss, the weights or a test metric became NaN/inf; the last good checkpoint is kept, no model saved."""


GATE_SNAPSHOT_STEPS = 5  # gates.csv: the hardened structure every this many steps of the search


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, dist: Dist, show: bool = False, amp_dtype: torch.dtype | None = None
) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) over the whole test set (summed over ranks); the forward under
    the training's autocast (`amp_dtype`), the cross-entropy in fp32."""
    was_training = model.training
    model.eval()
    correct = loss = count = 0.0
    with tqdm(loader, desc="evaluating", disable=not show, leave=False) as batches:  # closed on errors too
        for x, y in batches:
            x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
            with autocast(amp_dtype, dist.device):
                logits = model(x)
            logits = logits.float()
            correct += float((logits.argmax(dim=1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            count += len(y)
    model.train(was_training)
    correct, loss, count = dist.all_sum([correct, loss, count])
    return correct / count, loss / count


class Trainer:
    """One run: `run()` prepares, resumes, trains epoch by epoch (checkpointing each) and finishes."""

    def __init__(self, cfg: RunConfig, dist: Dist | None = None, restart_on_config_change: bool = False):
        """`restart_on_config_change`: a checkpoint written with another config is discarded (pipelines whose
        params changed) instead of refused (a mistyped --out)."""
        self.cfg = cfg.validate()
        self.dist = dist or setup_distributed()
        self.amp_dtype = autocast_dtype(cfg.optim.amp, self.dist.device)  # refused here, before any data is read
        use_tensor_cores(self.dist.device)
        self.out = Path(cfg.out)
        self.folder = RunFolder(self.out, restart_on_config_change, self._log, self.dist.main)
        self.show = cfg.progress and self.dist.main and not os.environ.get("CI")
        self.pruner: Pruner | None = None
        self.history: list[dict] = []
        self.gate_rows: list[dict] = []
        self.started, self.epochs_run = time.perf_counter(), 0  # this session's clock, for the time left

    def _log(self, message: str, warning: bool = False) -> None:
        if self.dist.main:
            print(message, flush=True, file=sys.stderr if warning else sys.stdout)

    def run(self) -> dict:
        if not self.dist.main:  # rank 0 holds the folder's lock for all
            return self._run()
        with self.folder.held():
            return self._run()

    def _run(self) -> dict:
        self._prepare()
        start = self._resume()
        if start == self.cfg.optim.epochs and self.folder.metrics_file.is_file():  # finished with this config and inputs
            damage = self.folder.saved_model_damage()
            if damage is None:
                self._log(f"[{self.out.name}] finished with this config: {self.folder.metrics_file} kept")
                return self.folder.finished_metrics()
            # the final files come from the last checkpoint alone (`_finish`): written again, they are the same bytes
            self._log(f"[{self.out.name}] finished, but {damage}: saving its final files again from its checkpoint", warning=True)
        self.net = self.model
        if self.dist.world > 1:  # after the resume: DDP broadcasts rank 0's weights when it wraps the model
            device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            # gates frozen after the search get no gradient: DDP must not wait for one
            frozen_later = self.pruner is not None and self.pruner.search_steps < self.pruner.total_steps
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids, find_unused_parameters=frozen_later)
        if self.cfg.optim.compile:  # only the training network: self.model keeps its plain state_dict keys
            self.net = torch.compile(self.net)
        for epoch in range(start, self.cfg.optim.epochs):
            sums, train_time = self._train_epoch(epoch)
            self._end_epoch(epoch, sums, train_time)
            self._save_checkpoint(epoch)
        return self._finish()

    def _prepare(self) -> None:
        """Data, teacher, model (gated by the pruner for HiAP), optimizer and schedule lengths."""
        cfg, dist = self.cfg, self.dist
        check_budget(cfg)
        torch.manual_seed(cfg.seed)
        self.loaders = build_loaders(
            cfg.data, cfg.model.img_size, cfg.optim.batch_size, cfg.seed, dist.rank, dist.world, dist.device.type == "cuda"
        )
        if self.loaders.num_classes != cfg.model.num_classes:
            raise ConfigError(
                f"invalid config: model.num_classes = {cfg.model.num_classes}, but {cfg.data.dataset} has "
                f"{self.loaders.num_classes} classes"
            )
        self.teacher = None if cfg.method == "dense" else load_teacher(cfg).to(dist.device).eval()
        self.cached_logits = None
        if cfg.teacher_logits is not None:
            if not hasattr(self.loaders.train, "views"):
                raise ConfigError("invalid config: teacher_logits: cached logits need an in-memory dataset, not imagenet")
            self.cached_logits = load_teacher_logits(cfg, teacher_fingerprint(cfg))
            self.loaders.train.views = True
        self.steps_per_epoch = len(self.loaders.train)
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.warmup = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        torch.manual_seed(cfg.seed)
        self.cut_val_loss: dict[int, float] = {}  # a head-removing baseline's candidates: heads per layer -> loss
        model = build_model(cfg, self.teacher, self._cut_val_loss if cfg.method in HEAD_COUNT_METHODS else None)
        if cfg.method == "hiap":
            self.pruner = make_pruner(cfg, model, self.total_steps)
        self.inputs = run_inputs(cfg, self.loaders, self.pruner and self.pruner.costs)  # fixed for the run
        self.model = model.to(dist.device)
        gate_ids = {id(p) for p in gate_parameters(self.model)}
        self.weights = [p for p in self.model.parameters() if id(p) not in gate_ids]
        groups = param_groups(self.model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.gate_lr, cfg.optim.macro_gate_lr_scale)
        for group in groups:
            group["base_lr"] = group["lr"]  # the schedule scales each group's own rate
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none (disabled: a no-op)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.amp_dtype == torch.float16)

    def _cut_val_loss(self, cut: nn.Module) -> float:
        """The validation loss of a baseline's candidate cut before fine-tuning: how it picks its head count."""
        if self.loaders.val is None:
            raise ConfigError(
                f"invalid config: method {self.cfg.method} picks its head count on the validation split: set data.val_size > 0"
            )
        loss = evaluate(cut.to(self.dist.device), self.loaders.val, self.dist, False, self.amp_dtype)[1]
        self.cut_val_loss[len(describe(cut).layers[0].heads)] = loss
        return loss

    def _resume(self) -> int:
        """Load the checkpoint of this config, if any; returns the first epoch to train."""
        state = self.folder.load_checkpoint(self.dist.device)
        if state is not None and not self.folder.belongs(state, self.cfg.to_dict(), self.inputs):
            state = None
        if state is None:
            if self.pruner is not None and self.dist.main:
                self.gate_rows = gate_rows_for(self.model, 0, self.steps_per_epoch)
            return 0
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled():  # fp16: the loss scale it had found (checkpoints of other modes have none)
            self.scaler.load_state_dict(state["scaler"])
        self.history, self.gate_rows = state["history"], state["gate_rows"]
        if self.pruner is not None:
            self.pruner.load_state_dict(state)
        self._log(f"[{self.out.name}] resuming {self.out} after epoch {state['epoch']}/{self.cfg.optim.epochs}")
        return state["epoch"]

    def _train_epoch(self, epoch: int) -> tuple[dict[str, float], float]:
        """One pass over the training data; returns the summed loss terms and the wall time."""
        cfg = self.cfg
        start = time.perf_counter()
        self.loaders.train.set_epoch(epoch)
        self.net.train()
        sums: dict[str, float] = {}
        desc = f"{cfg.method} epoch {epoch + 1}/{cfg.optim.epochs}"
        with tqdm(self.loaders.train, desc=desc, disable=not self.show, leave=False) as batches:  # closed on errors too
            for i, (x, y, *views) in enumerate(batches):
                cached = self.cached_logits[views[0]] if views else None
                loss = self._train_step(epoch, i, x, y, sums, cached)
                if self.show:
                    batches.set_postfix(loss=f"{loss:.3f}")
        return sums, time.perf_counter() - start

    def _train_step(
        self, epoch: int, i: int, x: torch.Tensor, y: torch.Tensor, sums: dict[str, float], cached: torch.Tensor | None = None
    ) -> float:
        """One optimiser step on batch `i` of `epoch` (`cached`: its teacher logits); adds its loss terms to
        `sums`, returns the loss."""
        cfg, pruner = self.cfg, self.pruner
        step = epoch * self.steps_per_epoch + i
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # gate noise and dropout: same on every rank, resumable
        factor = lr_factor(step, self.total_steps, self.warmup, cfg.optim.min_lr / cfg.optim.lr)
        # the gates search from the first step: a warmup of their rate would freeze the logits while the
        # budget controller, seeing no cost move, drives the penalty scale up (measured: 10% accuracy); `constant`
        # keeps the rate of the first step through the search, which ends before the weights' rate has decayed
        gate_factor = 1.0
        if cfg.optim.gate_lr_schedule == "cosine":
            gate_factor = lr_factor(step, self.total_steps, 0, cfg.optim.min_lr / cfg.optim.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * (gate_factor if group.get("gates") else factor)
        if pruner is not None:
            pruner.set_step(step)  # rounds and freezes the gates at the end of the search
        x, y = x.to(self.dist.device, non_blocking=True), y.to(self.dist.device, non_blocking=True)
        if cached is not None:
            cached = cached.to(self.dist.device, non_blocking=True)
        terms = step_loss(self.net, x, y, cfg, self.teacher, pruner, self.amp_dtype, cached)
        self._check_finite(terms, epoch, i)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        if cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            # the weights only: a penalty spike on the gate logits would otherwise shrink the weights' update
            nn.utils.clip_grad_norm_(self.weights, cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)  # fp16: skipped when the scaled gradients overflowed
        self.scaler.update()
        if pruner is not None:
            pruner.after_step(step)
            searching, frozen_first = step < pruner.search_steps, step == pruner.search_steps  # by step: resumes alike
            due = searching and ((step + 1) % GATE_SNAPSHOT_STEPS == 0 or step + 1 == pruner.search_steps)
            if self.dist.main and (due or frozen_first):  # the first frozen step shows the rounded structure
                self.gate_rows = self.gate_rows + gate_rows_for(self.model, step + 1, self.steps_per_epoch)
        values = {k: float(v.detach()) for k, v in terms.items()}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        return values["loss"]

    def _check_landed(self, budget: dict) -> None:
        """A budget-exact run whose rounding could not reach its target within the tolerance says so, loudly,
        and marks its metrics (`budget.missed_target`): never a silent exit 0 off target."""
        missed = abs(budget["cost_fraction"] / budget["target_fraction"] - 1) > self.cfg.hiap.budget_tolerance
        budget["missed_target"] = missed
        if missed:
            self._log(
                f"WARNING [{self.out.name}]: missed its budget: {budget['cost_fraction']:.4f} of dense {budget['unit']} "
                f"against a target of {budget['target_fraction']:.4f} (tolerance {self.cfg.hiap.budget_tolerance:.2%})",
                warning=True,
            )

    def _check_finite(self, terms: dict[str, torch.Tensor], epoch: int, batch: int) -> None:
        if torch.isfinite(terms["loss"].detach()):
            return
        values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        self._diverged(f"non-finite loss at epoch {epoch + 1}, step {batch} ({values})")

    def _check_epoch_finite(self, epoch: int, val_loss: float) -> None:
        """Weights blown up by an epoch's last steps show in its validation loss or parameters, not in its
        losses: such an epoch is never checkpointed, so every checkpoint kept is a good one."""
        weights = all(bool(torch.isfinite(p.detach()).all()) for p in self.model.parameters())
        if not (weights and math.isfinite(val_loss)):
            self._diverged(f"non-finite weights or validation loss after epoch {epoch + 1} (val_loss={val_loss:.4g})")

    def _diverged(self, what: str) -> None:
        kept = (
            f"the last good checkpoint {self.folder.checkpoint} is kept"
            if self.folder.checkpoint.is_file()
            else "no checkpoint was written yet"
        )
        raise TrainingDiverged(f"{what}; {kept}, no model saved. Lower optim.lr or the lambdas.")

    def _end_epoch(self, epoch: int, sums: dict[str, float], train_time: float) -> None:
        """Evaluate on the validation split (the test set only at the end: no choice may look at it), append
        the history row (and the gate state), log one line."""
        cfg, pruner = self.cfg, self.pruner
        acc, val_loss = math.nan, sums["loss"] / self.steps_per_epoch
        if self.loaders.val is not None:
            acc, val_loss = evaluate(self.model, self.loaders.val, self.dist, self.show, self.amp_dtype)
        self._check_epoch_finite(epoch, val_loss)
        row = {
            "epoch": epoch + 1,
            **{f"train_{k}": v / self.steps_per_epoch for k, v in sums.items()},
            "val_acc": acc,
            "val_loss": val_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "steps_per_epoch": self.steps_per_epoch,
            "epoch_time_s": train_time,
            "train_images_per_s": self.steps_per_epoch * cfg.optim.batch_size / train_time,
        }
        gated = ""
        if pruner is not None:
            row.update(
                tau=pruner.tau,
                expected_macs=float(expected_macs(self.model).total.detach()),
                hard_macs=count_macs(self.model),
                penalty_scale=pruner.penalty_scale,
            )
            gated = f" tau {pruner.tau:.3f}"
        self.history = self.history + [row]
        self.epochs_run += 1
        macs = row["hard_macs"] if pruner is not None else count_macs(self.model)
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.epochs_run * (cfg.optim.epochs - epoch - 1)
        progress = f"[{self.out.name}] {cfg.method} epoch {epoch + 1}/{cfg.optim.epochs}"
        self._log(
            f"{progress} loss {row['train_loss']:.4f} val acc {acc:.4f} MACs {macs / 1e6:.1f}M{gated} "
            f"({train_time:.0f}s; {_clock(elapsed)} elapsed, ~{_clock(left)} left)"
        )

    def _save_checkpoint(self, epoch: int) -> None:
        if not self.dist.main:
            return
        state = {
            "epoch": epoch + 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "gate_rows": self.gate_rows,
            "config": self.cfg.to_dict(),
            "rng": torch.get_rng_state(),
            "scaler": self.scaler.state_dict(),  # empty unless fp16
        }
        state["inputs"] = self.inputs
        if self.pruner is not None:
            state.update(self.pruner.state_dict())
        budget_rows = self.pruner.budget_rows if self.pruner is not None else []
        self.folder.save_checkpoint(state, self.history, self.gate_rows, budget_rows)

    def _finish(self) -> dict:
        """Extract (HiAP), evaluate the final plain model, save it, write metrics.json. Idempotent."""
        cfg = self.cfg
        self.model.eval()
        if self.pruner is not None:
            final = self.pruner.finish()
        elif cfg.method in ("dense", "finetune"):
            final = extract(gate_vit(copy.deepcopy(self.model)))  # the same weights as a plain PrunedViT
        else:
            final = self.model
        acc, test_loss = evaluate(final, self.loaders.test, self.dist, self.show, self.amp_dtype)
        if not math.isfinite(test_loss):
            self._diverged(f"non-finite test loss of the final model ({test_loss})")
        metrics = final_metrics(cfg, final, acc, test_loss, self.history, self.total_steps)
        if self.loaders.val is not None:
            metrics["val_acc"], metrics["val_loss"] = evaluate(final, self.loaders.val, self.dist, self.show, self.amp_dtype)
        if self.cut_val_loss:  # the pick, and what it was picked from
            metrics["cut"] = {"heads": len(describe(final).layers[0].heads), "val_loss_by_heads": self.cut_val_loss}
        if self.pruner is not None:
            metrics["structure"] = self.pruner.summary()
            if self.pruner.rounding:
                metrics["budget"] = {"cost": cfg.hiap.cost, **self.pruner.rounding}
                self._check_landed(metrics["budget"])
        if self.dist.main:
            self.folder.save_final(final, metrics, self.pruner.closing_steps() if self.pruner is not None else None)
            val = metrics.get("val_acc", math.nan)
            self._log(
                f"[{self.out.name}] {cfg.method} final: test acc {acc:.4f}, val acc {val:.4f}, {metrics['macs'] / 1e6:.2f}M MACs "
                f"({metrics['reduction_pct']:.1f}% cut), {metrics['params'] / 1e6:.3f}M params -> {self.out}"
            )
        return metrics


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def final_metrics(cfg: RunConfig, final: nn.Module, acc: float, test_loss: float, history: list[dict], steps: int) -> dict:
    """metrics.json of a run: accuracy, MACs in both conventions, reduction, params, training time, the optimizer
    steps it trained and `total_steps`, those with the search steps that found its structure (a transplant's:
    its HiAP run's; a one-shot cut has none, HiAP's are among its own)."""
    macs, dense_macs = count_macs(final), count_macs(final.spec.dense())
    search = 0
    if cfg.method in TRANSPLANTS:
        search = json.loads((Path(cfg.structure) / "metrics.json").read_text())["structure"]["search_steps"]
    return {
        "method": cfg.method,
        "target_macs": cfg.target_macs,
        "test_acc": acc,
        "test_loss": test_loss,
        "macs": macs,
        "macs_no_attn_matmul": count_macs(final, attention_matmuls=False),
        "dense_macs": dense_macs,
        "macs_fraction": macs / dense_macs,
        "reduction_pct": 100 * (1 - macs / dense_macs),
        "params": sum(p.numel() for p in final.parameters()),
        "epochs": cfg.optim.epochs,
        "steps": steps,
        "total_steps": steps + search,
        "train_time_s": sum(r["epoch_time_s"] for r in history),
        "machine": machine(),  # the bits of the weights depend on the thread count (DESIGN.md, "Determinism")
    }


def train(cfg: RunConfig) -> dict:
    """Run (or resume) one training run; returns the final metrics."""
    return Trainer(cfg).run()
