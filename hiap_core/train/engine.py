"""One training engine for dense, HiAP and baseline runs; resumable, DDP-ready.

    python -m hiap_core.train --params params.yaml --method hiap --out runs/hiap --set hiap.lambda_macro=4
    torchrun --nproc_per_node=2 -m hiap_core.train ...   (gloo on CPU, nccl on GPU)

Writes into `--out`: `checkpoint.pt` (every epoch, atomic; rerunning the same command resumes),
`history.csv` (per epoch: accuracy, loss terms, temperature, expected and hard MACs), `gates.csv` (tidy
hardened structure per layer every 5 steps of the search, and once frozen), `closing.csv` (the step each
gated unit closed at), `budget.csv` (budget-exact mode: penalty scale, target and hardened cost per
step), `metrics.json` (final, for `dvc metrics show`) and `model/` (the extracted model,
`load_pruned`-able). HiAP itself is `hiap_core.Pruner`; this engine adds data, teacher, schedule,
evaluation, checkpoints and reports around it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm  # console bars: tqdm.auto warns in kernels without ipywidgets

from ..core.baselines import prune_to_target, transplant
from ..core.budget import InfeasibleBudget, target_fraction
from ..core.cost import UnitCosts, count_macs, expected_macs, load_cost_table, unit_costs
from ..core.describe import describe
from ..core.errors import first_line
from ..core.extract import extract, structure_summary
from ..core.files import LockHeld, atomic_write, exclusive_lock, file_sha256, remove_leftover_temporaries
from ..core.gated_vit import gate_parameters, gate_vit
from ..core.losses import kd_loss
from ..core.pruned import WEIGHTS_FILE, load_pruned, save_pruned
from ..core.pruner import Pruner, param_groups
from .config import ConfigError, RunConfig, read_by
from .data import build_loaders, load_teacher_logits


class TrainingDiverged(RuntimeError):
    """The loss, the weights or a test metric became NaN/inf; the last good checkpoint is kept, no model saved."""


MIN_FREE_BYTES = 64 * 2**20  # below this a checkpoint (model + Adam moments) of the study's models may not fit
# Config fields added after checkpoints of the study were written, whose default is the behaviour of the code
# that wrote them: a checkpoint without the field resumes while the run keeps the default (on CPU `amp: auto`
# is the old fp32 path). Not every later field qualifies: `hiap.search_fraction`'s default changed training.
FIELDS_DEFAULT_WHEN_ABSENT = ("optim.amp", "optim.compile")


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


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `optim.amp` on `device`; None: no autocast, plain fp32. `auto` is bf16 on a CUDA
    GPU that has it and fp32 elsewhere (fp16 needs loss scaling: only on request). An explicit bf16 or
    fp16 where it cannot run is refused rather than silently trained in fp32."""
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if amp == "auto":
        return torch.bfloat16 if bf16_gpu else None
    if amp == "off":
        return None
    if device.type != "cuda" or (amp == "bf16" and not bf16_gpu):
        where = "this GPU has no bf16" if device.type == "cuda" else f"this run is on {device.type}"
        raise ConfigError(f"invalid config: optim.amp = {amp!r}: needs a CUDA GPU with {amp} ({where}); use auto or off")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(dtype: torch.dtype | None, device: torch.device):
    """Mixed precision for the forward passes under `dtype`; nothing at all for None (CPU stays bit-exact)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def use_tensor_cores(device: torch.device) -> None:
    """TF32 for the fp32 matmuls and convolutions on CUDA (those autocast leaves in fp32, and all of them with
    `amp: off`): a 10-bit mantissa inside the product, fp32 accumulation, several times the fp32 speed."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_dense_model(cfg: RunConfig) -> nn.Module:
    """The dense timm ViT of the config: random init, or `model.pretrained` (a checkpoint file or "hub")."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    m = cfg.model
    if m.name == "custom":
        model = VisionTransformer(
            img_size=m.img_size,
            patch_size=m.patch_size,
            in_chans=m.in_chans,
            num_classes=m.num_classes,
            embed_dim=m.embed_dim,
            depth=m.depth,
            num_heads=m.num_heads,
            mlp_ratio=m.mlp_ratio,
            drop_path_rate=m.drop_path,
        )
    else:
        hub = m.pretrained == "hub"
        try:
            model = timm.create_model(
                m.name,
                pretrained=hub,
                num_classes=m.num_classes,
                drop_path_rate=m.drop_path,
                img_size=m.img_size,
                in_chans=m.in_chans,
            )
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
            raise ConfigError(
                f"model.pretrained = {m.pretrained!r}: file not found. Download the {m.name} weights "
                "(timm checkpoint, .pth or .safetensors) and point model.pretrained at them"
            )
        try:
            timm.models.load_checkpoint(model, str(path), strict=True)
        except Exception as err:  # torch and timm raise many types for a foreign or truncated file
            raise ConfigError(
                f"model.pretrained = {m.pretrained!r} cannot be loaded into {m.name} ({first_line(err)[:200]}): it must be a "
                "timm state dict of this model (.pth or .safetensors), not a training checkpoint.pt (a run's teacher "
                "is its folder: teacher = RUN_FOLDER)"
            ) from err
    return model


def load_teacher(cfg: RunConfig) -> nn.Module:
    """The dense teacher: the dense run's saved model, or the pretrained checkpoint."""
    if cfg.teacher is None:
        return build_dense_model(cfg).eval()
    folder = Path(cfg.teacher) / "model"
    if not folder.is_dir():
        raise ConfigError(f"teacher = {cfg.teacher!r}: {folder} not found; run the dense stage first (method dense)")
    try:
        return load_pruned(folder)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"teacher = {cfg.teacher!r}: {err}; rerun the dense stage (method dense)") from err


def teacher_fingerprint(cfg: RunConfig) -> str:
    """sha256 of the teacher's weights file (the dense run's, or `model.pretrained`): a retrained teacher in
    the same folder makes every run distilled from it another run."""
    if cfg.teacher is not None:
        return file_sha256(Path(cfg.teacher) / "model" / WEIGHTS_FILE)
    return file_sha256(Path(cfg.model.pretrained)) if cfg.model.pretrained not in (None, "hub") else str(cfg.model.pretrained)


def build_model(cfg: RunConfig, teacher: nn.Module | None) -> nn.Module:
    """The model a run trains: dense (random init), the teacher's weights (HiAP's student, not yet gated;
    the unpruned fine-tuning control), or a baseline cut from the teacher and extracted."""
    if cfg.method == "dense":
        return build_dense_model(cfg)
    dense = build_dense_model(cfg) if cfg.teacher is not None else copy.deepcopy(teacher)
    if cfg.teacher is not None:
        try:
            dense.load_state_dict(teacher.state_dict())
        except RuntimeError as err:
            first = next(line.strip() for line in str(err).splitlines()[1:] if line.strip())  # line 0 is a header
            raise ConfigError(f"teacher = {cfg.teacher!r} does not match the model config: {first}") from err
    if cfg.method in ("hiap", "finetune"):
        return dense
    if cfg.method == "transplant":
        return transplant(dense.eval(), pd.read_csv(structure_file(cfg)).to_dict("records"))
    return prune_to_target(dense.eval(), cfg.method, cfg.target_macs)


def structure_file(cfg: RunConfig) -> Path:
    """The `closing.csv` of a transplant's HiAP run (`structure`): one line naming the field when it is not one."""
    path = Path(cfg.structure) / "closing.csv"
    if not path.is_file():
        raise ConfigError(
            f"invalid config: structure = {cfg.structure!r}: {path} not found; transplant needs a finished HiAP run"
        )
    return path


def cost_model(cfg: RunConfig, spec) -> UnitCosts:
    """The unit costs the penalties use: MACs, or the measured latency table (`hiap.cost`)."""
    if cfg.hiap.cost == "macs":
        return unit_costs(spec)
    try:
        return load_cost_table(cfg.hiap.cost_table, spec)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ConfigError(f"invalid config: hiap.cost_table = {cfg.hiap.cost_table!r}: {err}") from err


def budget_field(cfg: RunConfig) -> tuple[str, float | None]:
    """The config field holding HiAP's budget, and its value (None: lambda mode)."""
    return ("hiap.target_latency", cfg.hiap.target_latency) if cfg.hiap.cost == "latency" else ("target_macs", cfg.target_macs)


def check_budget(cfg: RunConfig) -> None:
    """Refuse a HiAP budget no model can meet (or an unreadable cost table) before any data or teacher is read:
    the check runs on the model built on the meta device."""
    field, target = budget_field(cfg)
    if cfg.method != "hiap" or target is None:
        return
    with torch.device("meta"):
        spec = describe(build_dense_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None))))
    h = cfg.hiap
    try:
        target_fraction(target, spec, cost_model(cfg, spec), h.min_heads, h.min_value_fraction, h.lambda_macro, h.lambda_micro)
    except InfeasibleBudget as err:
        raise ConfigError(f"invalid config: {field} = {target!r}: {err}") from err


def make_pruner(cfg: RunConfig, model: nn.Module, total_steps: int) -> Pruner:
    """The run's `Pruner` from the `hiap` settings (gates `model` in place); a budget no model can meet is
    refused here, before training, naming the field."""
    h = cfg.hiap
    costs = cost_model(cfg, describe(model))
    field, target = budget_field(cfg)
    try:
        return Pruner(
            model,
            total_steps,
            lambda_macro=h.lambda_macro,
            lambda_micro=h.lambda_micro,
            lambda_feas=h.lambda_feas,
            tau0=h.tau0,
            tau_min=h.tau_min,
            init_logit=h.init_logit,
            min_heads=h.min_heads,
            min_value_fraction=h.min_value_fraction,
            min_neuron_fraction=h.min_neuron_fraction,
            costs=costs,
            target=target,
            budget_lr=h.budget_lr,
            budget_gain=h.budget_gain,
            budget_deadline=h.budget_deadline,
            budget_tolerance=h.budget_tolerance,
            search_fraction=h.search_fraction,
            gate_forward=h.gate_forward,
        )
    except InfeasibleBudget as err:
        raise ConfigError(f"invalid config: {field} = {target!r}: {err}") from err


def step_loss(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: RunConfig,
    teacher: nn.Module | None = None,
    pruner: Pruner | None = None,
    amp_dtype: torch.dtype | None = None,
    cached: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The loss of one batch under `loss`, with its terms: cross-entropy without a teacher (dense), KD from
    the teacher (baselines), KD plus HiAP's penalties with a pruner. The student and teacher forwards run
    under autocast to `amp_dtype`; the losses and penalties outside it, in fp32 (a bf16 KL of two close
    distributions, or a penalty summed over thousands of gates, would lose the small differences that train).
    `cached`: the teacher's logits of this batch, read from its cache instead of a teacher forward."""
    with autocast(amp_dtype, x.device):
        logits = net(x)
        teacher_logits = cached
        if teacher is not None and cached is None:
            with torch.no_grad():
                teacher_logits = teacher(x)
    logits = logits.float()
    if teacher is None:
        task = F.cross_entropy(logits, y, label_smoothing=cfg.optim.label_smoothing)
        return {"loss": task, "task": task}
    task = kd_loss(logits, teacher_logits.float(), y, cfg.hiap.kd_alpha, cfg.hiap.kd_temperature, cfg.optim.label_smoothing)
    return pruner.loss(task) if pruner is not None else {"loss": task, "task": task}


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + 0.5 * (1 - min_ratio) * (1 + math.cos(math.pi * min(progress, 1.0)))


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


def _flat(config: dict, prefix: str = "") -> dict:
    """A config dict as {"optim.lr": 0.001, ...}: a changed config is reported field by field."""
    flat = {}
    for key, value in config.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


# Fields that change how a run computes, not what: where it writes, its progress bars, whether the teacher's
# logits come from their cache (equal to the live forward; the teacher's own weights are fingerprinted)
HOW_FIELDS = ("out", "progress", "teacher_logits")


def changed_fields(saved: dict, now: dict) -> list[str]:
    """The fields (`optim.lr`, ...) whose value differs between a checkpoint's config and this run's, except
    `HOW_FIELDS` and the fields its method does not read (a dense run is
    the same run whatever `hiap.lambda_macro` says, as its DVC stage, which does not track `hiap`, agrees). A
    field of `FIELDS_DEFAULT_WHEN_ABSENT` that the checkpoint lacks counts as its default."""
    method, saved, now, defaults = now["method"], _flat(saved), _flat(now), _flat(RunConfig().to_dict())
    saved = {**{k: defaults[k] for k in FIELDS_DEFAULT_WHEN_ABSENT if k not in saved}, **saved}
    return sorted(
        k for k in now.keys() | saved.keys() if k not in HOW_FIELDS and read_by(method, k) and saved.get(k) != now.get(k)
    )


def _write_reports(out: Path, history: list[dict], gate_rows: list[dict], budget_rows: list[dict]) -> None:
    atomic_write(out / "history.csv", lambda p: pd.DataFrame(history).to_csv(p, index=False))
    if gate_rows:
        atomic_write(out / "gates.csv", lambda p: pd.DataFrame(gate_rows).to_csv(p, index=False))
    if budget_rows:
        atomic_write(out / "budget.csv", lambda p: pd.DataFrame(budget_rows).to_csv(p, index=False))


LOCK_FILE = ".run.lock"  # held by the process training into a run folder
GATE_SNAPSHOT_STEPS = 5  # gates.csv: the hardened structure every this many steps of the search


def gate_rows_for(model: nn.Module, step: int, steps_per_epoch: int) -> list[dict]:
    """The hardened structure per layer after `step` optimizer steps (`epoch`: the same as a fraction)."""
    table = structure_summary(model).iloc[:-1]
    rows = table.drop(columns=["macs", "macs_no_attn_matmul", "params", "head_ids"]).to_dict("records")
    for row in rows:
        row["step"], row["epoch"] = step, step / steps_per_epoch
        row["value_dims"] = " ".join(map(str, row["value_dims"]))
    return rows


class Trainer:
    """One run: `run()` prepares, resumes, trains epoch by epoch (checkpointing each) and finishes."""

    def __init__(self, cfg: RunConfig, dist: Dist | None = None, restart_on_config_change: bool = False):
        """`restart_on_config_change`: a checkpoint written with another config is discarded (pipelines whose
        params changed) instead of refused (a mistyped --out)."""
        self.cfg = cfg.validate()
        self.restart_on_config_change = restart_on_config_change
        self.dist = dist or setup_distributed()
        self.amp_dtype = autocast_dtype(cfg.optim.amp, self.dist.device)  # refused here, before any data is read
        use_tensor_cores(self.dist.device)
        self.out = Path(cfg.out)
        self.checkpoint = self.out / "checkpoint.pt"
        self.show = cfg.progress and self.dist.main and not os.environ.get("CI")
        self.pruner: Pruner | None = None
        self.history: list[dict] = []
        self.gate_rows: list[dict] = []
        self.started, self.epochs_run = time.perf_counter(), 0  # this session's clock, for the time left

    def _log(self, message: str) -> None:
        if self.dist.main:
            print(message, flush=True)

    def run(self) -> dict:
        created = not self.out.exists()
        self._check_out_writable()
        if not self.dist.main:
            return self._run()
        try:
            return self._run_locked()
        except BaseException:
            # a refused config (or a run that failed before writing anything) leaves no folder; one that wrote
            # something keeps it, lock file included (another process may be waiting on that very file)
            if created and self.out.is_dir() and [p.name for p in self.out.iterdir()] == [LOCK_FILE]:
                (self.out / LOCK_FILE).unlink()
                with contextlib.suppress(OSError):  # another process wrote into it meanwhile: keep it
                    self.out.rmdir()
            raise

    def _run_locked(self) -> dict:
        # a pipeline stage waits for the process training its run, then finds it finished; by hand: refused
        wait = (
            (lambda holder: self._log(f"[{self.out.name}] waiting for process {holder}, which trains into {self.out}"))
            if self.restart_on_config_change
            else None
        )
        try:
            with exclusive_lock(self.out / LOCK_FILE, wait):
                remove_leftover_temporaries(self.out)
                return self._run()
        except LockHeld as err:
            raise ConfigError(
                f"out = {str(self.out)!r} is in use by another run (process {err.holder}): wait for it, or use another --out"
            ) from err

    def _run(self) -> dict:
        self._prepare()
        start = self._resume()
        finished = self.out / "metrics.json"
        if start == self.cfg.optim.epochs and finished.is_file():  # finished with this config and inputs: as it was
            self._log(f"[{self.out.name}] finished with this config: {finished} kept")
            return json.loads(finished.read_text())
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

    def _check_out_writable(self) -> None:
        """Refuse a folder that cannot be written, or has no room for a checkpoint, before any training."""
        if not self.dist.main:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.out):
                pass
            free = shutil.disk_usage(self.out).free
        except OSError as err:
            raise ConfigError(f"out = {str(self.out)!r}: cannot write there ({err.strerror or err})") from err
        if free < MIN_FREE_BYTES:
            raise ConfigError(f"out = {str(self.out)!r}: only {free / 2**20:.0f} MiB free; checkpoints need room")

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
        model = build_model(cfg, self.teacher)
        if cfg.method == "hiap":
            self.pruner = make_pruner(cfg, model, self.total_steps)
        self.inputs = self._inputs()  # fixed for the run: fingerprinted once
        self.model = model.to(dist.device)
        gate_ids = {id(p) for p in gate_parameters(self.model)}
        self.weights = [p for p in self.model.parameters() if id(p) not in gate_ids]
        groups = param_groups(self.model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.gate_lr)
        for group in groups:
            group["base_lr"] = group["lr"]  # the schedule scales each group's own rate
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none (disabled: a no-op)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.amp_dtype == torch.float16)

    def _resume(self) -> int:
        """Load the checkpoint of this config, if any; returns the first epoch to train."""
        state = self._load_checkpoint()
        if state is not None:
            changed = changed_fields(state["config"], self.cfg.to_dict())
            saved = state.get("inputs", {})
            changed += [what for what, value in self.inputs.items() if saved.get(what) != value]
            if changed and not self.restart_on_config_change:
                raise ConfigError(
                    f"{self.checkpoint} was written with a different config ({', '.join(changed)}): "
                    "use another --out or delete the folder to start over"
                )
            if changed:
                self._log(f"[{self.out.name}] {self.checkpoint} has another config ({', '.join(changed)}): starting over")
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

    def _inputs(self) -> dict[str, str]:
        """Fingerprints of what the run reads by path or derives from files, beside its config: the same
        config over another teacher, data split or re-measured cost table is another run."""
        split = hashlib.sha256()
        for loader in (self.loaders.train, self.loaders.val):
            ids = getattr(getattr(loader, "data", None), "ids", None)  # in-memory datasets
            split.update(b"none" if ids is None else ids.numpy().tobytes())
        inputs = {"data split": split.hexdigest()}
        if self.cfg.method != "dense":
            inputs["teacher's weights"] = teacher_fingerprint(self.cfg)
        if self.cfg.method == "transplant":
            inputs["structure's kept units"] = file_sha256(structure_file(self.cfg))
        if self.pruner is not None and self.cfg.hiap.cost == "latency":
            inputs["hiap.cost_table's coefficients"] = json.dumps(dataclasses.asdict(self.pruner.costs), sort_keys=True)
        return inputs

    def _load_checkpoint(self) -> dict | None:
        """The checkpoint's state; None without one. An unreadable one (written by something other than this
        engine, whose writes are atomic) is moved aside and the run starts over in pipelines, refused otherwise."""
        if not self.checkpoint.is_file():
            return None
        try:
            return torch.load(self.checkpoint, map_location=self.dist.device, weights_only=False)
        except Exception as err:  # torch raises many types for a truncated or foreign file
            why = f"{self.checkpoint} is corrupt or not a checkpoint ({type(err).__name__})"
            if not self.restart_on_config_change:
                raise ConfigError(f"{why}: delete it to start the run over, or use another --out") from err
        if self.dist.main:
            self.checkpoint.replace(self.checkpoint.with_suffix(".pt.corrupt"))
        self._log(f"{why}: moved to {self.checkpoint.name}.corrupt, starting over")
        return None

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
        # budget controller, seeing no cost move, drives the penalty scale up (measured: 10% accuracy)
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
                f"against a target of {budget['target_fraction']:.4f} (tolerance {self.cfg.hiap.budget_tolerance:.2%})"
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
            f"the last good checkpoint {self.checkpoint} is kept"
            if self.checkpoint.is_file()
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
        atomic_write(self.checkpoint, lambda p: torch.save(state, p))
        budget_rows = self.pruner.budget_rows if self.pruner is not None else []
        _write_reports(self.out, self.history, self.gate_rows, budget_rows)

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
        metrics = final_metrics(cfg, final, acc, test_loss, self.history)
        if self.loaders.val is not None:
            metrics["val_acc"], metrics["val_loss"] = evaluate(final, self.loaders.val, self.dist, self.show, self.amp_dtype)
        if self.pruner is not None:
            metrics["structure"] = self.pruner.summary()
            if self.pruner.rounding:
                metrics["budget"] = {"cost": cfg.hiap.cost, **self.pruner.rounding}
                self._check_landed(metrics["budget"])
        if self.dist.main:
            save_pruned(final, self.out / "model")
            atomic_write(self.out / "summary.csv", lambda p: structure_summary(final).to_csv(p, index=False))
            if self.pruner is not None:
                closing = pd.DataFrame(self.pruner.closing_steps())
                atomic_write(self.out / "closing.csv", lambda p: closing.to_csv(p, index=False))
            atomic_write(self.out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2, allow_nan=False)))
            val = metrics.get("val_acc", math.nan)
            self._log(
                f"[{self.out.name}] {cfg.method} final: test acc {acc:.4f}, val acc {val:.4f}, {metrics['macs'] / 1e6:.2f}M MACs "
                f"({metrics['reduction_pct']:.1f}% cut), {metrics['params'] / 1e6:.3f}M params -> {self.out}"
            )
        return metrics


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def final_metrics(cfg: RunConfig, final: nn.Module, acc: float, test_loss: float, history: list[dict]) -> dict:
    """metrics.json of a run: accuracy, MACs in both conventions, reduction, params, training time."""
    macs, dense_macs = count_macs(final), count_macs(final.spec.dense())
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
        "train_time_s": sum(r["epoch_time_s"] for r in history),
    }


def train(cfg: RunConfig) -> dict:
    """Run (or resume) one training run; returns the final metrics."""
    return Trainer(cfg).run()
