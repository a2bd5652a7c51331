"""The models a run trains and learns from: the dense timm ViT of the config, the teacher (the dense run's
saved model or a pretrained checkpoint) and its fingerprint, and the student of each method (HiAP's ungated
copy of the teacher, or a baseline cut from it)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from torch import nn

from ..core.baselines import prune_to_target, transplant
from ..core.errors import first_line
from ..core.files import file_sha256
from ..core.pruned import WEIGHTS_FILE, load_pruned
from .config import TRANSPLANTS, ConfigError, RunConfig


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


def load_model(run: str | Path, role: str, stage: str) -> nn.Module:
    """The saved model of run folder `run` (`model/`, hash-checked); one line naming `role` (the field that names
    the run) and `stage` (what writes it) when it is missing or damaged."""
    folder = Path(run) / "model"
    if not folder.is_dir():
        raise ConfigError(f"{role} = {str(run)!r}: {folder} not found; run {stage} first")
    try:
        return load_pruned(folder)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{role} = {str(run)!r}: {err}; rerun {stage}") from err


def load_teacher(cfg: RunConfig) -> nn.Module:
    """The dense teacher: the dense run's saved model, or the pretrained checkpoint."""
    if cfg.teacher is None:
        return build_dense_model(cfg).eval()
    return load_model(cfg.teacher, "teacher", "the dense stage (method dense)")


def teacher_fingerprint(cfg: RunConfig) -> str:
    """sha256 of the teacher's weights file (the dense run's, or `model.pretrained`): a retrained teacher in
    the same folder makes every run distilled from it another run."""
    if cfg.teacher is not None:
        return file_sha256(Path(cfg.teacher) / "model" / WEIGHTS_FILE)
    return file_sha256(Path(cfg.model.pretrained)) if cfg.model.pretrained not in (None, "hub") else str(cfg.model.pretrained)


def build_model(cfg: RunConfig, teacher: nn.Module | None, score: Callable[[nn.Module], float] | None = None) -> nn.Module:
    """The model a run trains: dense (random init), the teacher's weights (HiAP's student, not yet gated;
    the unpruned fine-tuning control), or a baseline cut from the teacher and extracted (`score`: how a
    head-removing baseline picks among the head counts that land, lowest first; `prune_to_target`)."""
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
    if cfg.method in TRANSPLANTS:
        student = transplant(dense.eval(), pd.read_csv(structure_file(cfg)).to_dict("records"))
        if student.spec.layers != load_model(cfg.structure, "structure", "its HiAP stage").spec.layers:
            raise ConfigError(
                f"invalid config: structure = {cfg.structure!r}: its closing.csv does not describe the units its "
                "model kept (changed since the run wrote it); rerun that HiAP run's stage"
            )
        return student
    return prune_to_target(dense.eval(), cfg.method, cfg.target_macs, score)


def structure_file(cfg: RunConfig) -> Path:
    """The `closing.csv` of a transplant's HiAP run (`structure`): one line naming the field when it is not one."""
    path = Path(cfg.structure) / "closing.csv"
    if not path.is_file():
        raise ConfigError(
            f"invalid config: structure = {cfg.structure!r}: {path} not found; {cfg.method} needs a finished HiAP run"
        )
    return path
