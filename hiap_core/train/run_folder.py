"""The folder a run trains into (`--out`), and everything that reads or writes there: its lock, the checkpoint
(whether it belongs to this run: config and input fingerprints), the per-epoch reports and the final files.
The training loop decides what to save and when; this module decides how, atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn

from ..core.extract import structure_summary
from ..core.files import LockHeld, atomic_write, exclusive_lock, file_sha256, remove_leftover_temporaries
from ..core.errors import first_line
from ..core.pruned import load_pruned, save_pruned
from .config import TRANSPLANTS, ConfigError, RunConfig, read_by
from .models import structure_file, teacher_fingerprint

LOCK_FILE = ".run.lock"  # held by the process training into a run folder
MIN_FREE_BYTES = 64 * 2**20  # below this a checkpoint (model + Adam moments) of the study's models may not fit
# Fields that change how a run computes, not what: where it writes, its progress bars, whether the teacher's
# logits come from their cache (equal to the live forward; the teacher's own weights are fingerprinted)
HOW_FIELDS = ("out", "progress", "teacher_logits")
# Config fields added after checkpoints of the study were written, whose default is the behaviour of the code
# that wrote them: a checkpoint without the field resumes while the run keeps the default (on CPU `amp: auto`
# is the old fp32 path). Not every later field qualifies: `hiap.search_fraction`'s default changed training.
FIELDS_DEFAULT_WHEN_ABSENT = ("optim.amp", "optim.compile", "optim.gate_lr_schedule", "hiap.lambda_polarise")


def _flat(config: dict, prefix: str = "") -> dict:
    """A config dict as {"optim.lr": 0.001, ...}: a changed config is reported field by field."""
    flat = {}
    for key, value in config.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


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


def run_inputs(cfg: RunConfig, loaders, costs) -> dict[str, str]:
    """Fingerprints of what the run reads by path or derives from files, beside its config: the same config
    over another teacher, data split or re-measured cost table (`costs`, HiAP's unit costs) is another run."""
    split = hashlib.sha256()
    for loader in (loaders.train, loaders.val):
        ids = getattr(getattr(loader, "data", None), "ids", None)  # in-memory datasets
        split.update(b"none" if ids is None else ids.numpy().tobytes())
    inputs = {"data split": split.hexdigest()}
    if cfg.method != "dense":
        inputs["teacher's weights"] = teacher_fingerprint(cfg)
    if cfg.method in TRANSPLANTS:
        inputs["structure's kept units"] = file_sha256(structure_file(cfg))
    if costs is not None and cfg.hiap.cost == "latency":
        inputs["hiap.cost_table's coefficients"] = json.dumps(dataclasses.asdict(costs), sort_keys=True)
    return inputs


def gate_rows_for(model: nn.Module, step: int, steps_per_epoch: int) -> list[dict]:
    """The rows of `gates.csv` for the hardened structure per layer after `step` optimizer steps (`epoch`:
    the same as a fraction)."""
    table = structure_summary(model).iloc[:-1]
    rows = table.drop(columns=["macs", "macs_no_attn_matmul", "params", "head_ids"]).to_dict("records")
    for row in rows:
        row["step"], row["epoch"] = step, step / steps_per_epoch
        row["value_dims"] = " ".join(map(str, row["value_dims"]))
    return rows


def check_writable(path: Path, field: str = "out") -> None:
    """Refuse a folder that cannot be written, or has no room for a checkpoint, before any work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        free = shutil.disk_usage(path).free
    except OSError as err:
        raise ConfigError(f"{field} = {str(path)!r}: cannot write there ({err.strerror or err})") from err
    if free < MIN_FREE_BYTES:
        raise ConfigError(f"{field} = {str(path)!r}: only {free / 2**20:.0f} MiB free; checkpoints need room")


class RunFolder:
    """`path` as one run's folder. `restart_on_config_change`: a checkpoint of another config (or an
    unreadable one) is set aside and the run starts over (pipelines whose params changed), instead of
    refused (a mistyped --out). `main`: this process writes (rank 0); the others only read."""

    def __init__(self, path: Path, restart_on_config_change: bool, log: Callable[[str], None], main: bool = True):
        self.path, self.restart_on_config_change, self.log, self.main = Path(path), restart_on_config_change, log, main
        self.checkpoint = self.path / "checkpoint.pt"
        self.metrics_file = self.path / "metrics.json"

    @contextlib.contextmanager
    def held(self):
        """Hold the folder's lock for the block (created and checked writable first). Held by another process:
        refused, or in pipelines waited for (the stage then finds the run finished). A block that fails before
        writing anything into a folder it created leaves no folder; only the lock's holder removes anything."""
        created = not self.path.exists()
        check_writable(self.path)
        wait = (
            (lambda holder: self.log(f"[{self.path.name}] waiting for process {holder}, which trains into {self.path}"))
            if (self.restart_on_config_change)
            else None
        )
        with contextlib.ExitStack() as lock:
            try:
                lock.enter_context(exclusive_lock(self.path / LOCK_FILE, wait))
            except LockHeld as err:
                raise ConfigError(
                    f"out = {str(self.path)!r} is in use by another run (process {err.holder}): wait for it, or use another --out"
                ) from err
            try:
                remove_leftover_temporaries(self.path)
                yield
            except BaseException:
                # a refused config (or a run that failed before writing anything) leaves no folder; one that wrote
                # something keeps it, lock file included (another process may be waiting on that very file)
                if created and [p.name for p in self.path.iterdir()] == [LOCK_FILE]:
                    (self.path / LOCK_FILE).unlink()
                    with contextlib.suppress(OSError):  # another process wrote into it meanwhile: keep it
                        self.path.rmdir()
                raise

    def load_checkpoint(self, map_location: torch.device) -> dict | None:
        """The checkpoint's state; None without one. An unreadable one (written by something other than this
        engine, whose writes are atomic) is moved aside and the run starts over in pipelines, refused otherwise."""
        if not self.checkpoint.is_file():
            return None
        try:
            return torch.load(self.checkpoint, map_location=map_location, weights_only=False)
        except Exception as err:  # torch raises many types for a truncated or foreign file
            why = f"{self.checkpoint} is corrupt or not a checkpoint ({type(err).__name__})"
            if not self.restart_on_config_change:
                raise ConfigError(f"{why}: delete it to start the run over, or use another --out") from err
        if self.main:
            self.checkpoint.replace(self.checkpoint.with_suffix(".pt.corrupt"))
        self.log(f"{why}: moved to {self.checkpoint.name}.corrupt, starting over")
        return None

    def belongs(self, state: dict, config: dict, inputs: dict[str, str]) -> bool:
        """Whether checkpoint `state` is of this run (same config fields and input fingerprints); one that is not
        is refused, or in pipelines announced (the run starts over)."""
        changed = changed_fields(state["config"], config)
        saved = state.get("inputs", {})
        changed += [what for what, value in inputs.items() if saved.get(what) != value]
        if changed and not self.restart_on_config_change:
            raise ConfigError(
                f"{self.checkpoint} was written with a different config ({', '.join(changed)}): "
                "use another --out or delete the folder to start over"
            )
        if changed:
            self.log(f"[{self.path.name}] {self.checkpoint} has another config ({', '.join(changed)}): starting over")
        return not changed

    def save_checkpoint(self, state: dict, history: list[dict], gate_rows: list[dict], budget_rows: list[dict]) -> None:
        """The checkpoint, then the reports it vouches for: `history.csv`, `gates.csv`, `budget.csv`."""
        atomic_write(self.checkpoint, lambda p: torch.save(state, p))
        atomic_write(self.path / "history.csv", lambda p: pd.DataFrame(history).to_csv(p, index=False))
        if gate_rows:
            atomic_write(self.path / "gates.csv", lambda p: pd.DataFrame(gate_rows).to_csv(p, index=False))
        if budget_rows:
            atomic_write(self.path / "budget.csv", lambda p: pd.DataFrame(budget_rows).to_csv(p, index=False))

    def saved_model_damage(self) -> str | None:
        """Why the run's saved model does not load (missing, damaged or replaced since it was written), or None."""
        try:
            load_pruned(self.path / "model")
        except (FileNotFoundError, ValueError) as err:
            return first_line(err)
        return None

    def finished_metrics(self) -> dict:
        return json.loads(self.metrics_file.read_text())

    def save_final(self, model: nn.Module, metrics: dict, closing_rows: list[dict] | None) -> None:
        """The extracted model (`model/`), its structure (`summary.csv`), HiAP's closing steps (`closing.csv`)
        and, last, `metrics.json`: a folder with metrics is a finished run."""
        save_pruned(model, self.path / "model")
        atomic_write(self.path / "summary.csv", lambda p: structure_summary(model).to_csv(p, index=False))
        if closing_rows is not None:
            atomic_write(self.path / "closing.csv", lambda p: pd.DataFrame(closing_rows).to_csv(p, index=False))
        atomic_write(self.metrics_file, lambda p: p.write_text(json.dumps(metrics, indent=2, allow_nan=False)))
