"""The teacher's logits, computed once for every training image and its flip, so that no fine-tune runs the
teacher at every step (a KD step costs about 20% more than a dense step on a CPU; the study's 50-odd
fine-tunes share one teacher). `python -m hiap_core.train.teacher_logits --params params.yaml --teacher
data/runs/dense --out data/runs/dense_logits` (the `teacher_logits` stage); a run reads the file through
`teacher_logits` in its config and checks that it was made from its teacher's weights and its images.
Exact only for augmentations that are a flip or nothing (`data.augment: flip | none`): a random crop is
not a finite set of views, so `crop_flip` runs refuse the cache."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..core.files import atomic_write
from .config import ConfigError, RunConfig, cli, config_from_params
from .data import NORMALIZATION, load_split

LOGITS_FILE = "logits.safetensors"
BATCH = 512


def images_fingerprint(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


@torch.no_grad()
def compute(cfg: RunConfig, out: Path) -> Path:
    """Write `out/logits.safetensors`: the teacher's fp32 logits of every training image (row `2 * id`) and
    of its horizontal flip (row `2 * id + 1`), `id` its index in the training file."""
    from .engine import autocast, autocast_dtype, load_teacher, teacher_fingerprint  # the engine reads this module

    if cfg.data.dataset == "imagenet":
        raise ConfigError("invalid config: data.dataset = 'imagenet': teacher logits are cached for the in-memory datasets")
    teacher, pool = load_teacher(cfg), load_split(cfg.data, "train")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, dtype = teacher.to(device).eval(), autocast_dtype(cfg.optim.amp, device)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in NORMALIZATION[cfg.data.dataset])
    logits = torch.empty(2 * len(pool.labels), cfg.model.num_classes)
    for start in range(0, len(pool.labels), BATCH):
        x = (pool.images[start : start + BATCH].float() / 255.0 - mean) / std
        for flipped, view in enumerate((x, x.flip(-1))):
            with autocast(dtype, device):
                logits[2 * start + flipped : 2 * (start + len(view)) : 2] = teacher(view.to(device)).float().cpu()
    metadata = {"teacher_sha256": teacher_fingerprint(cfg), "images_sha256": images_fingerprint(pool.images)}
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write(out / LOGITS_FILE, lambda p: p.write_bytes(save({"logits": logits}, metadata)))


def load(cfg: RunConfig, teacher_sha256: str) -> torch.Tensor:
    """The cached logits of `cfg.teacher_logits`, refused in one line unless they were made from this teacher
    (`teacher_sha256`) and these training images, for a flip-only augmentation."""
    path = Path(cfg.teacher_logits) / LOGITS_FILE
    where = f"invalid config: teacher_logits = {cfg.teacher_logits!r}"
    if cfg.data.augment == "crop_flip":
        raise ConfigError(f"{where}: cached logits are exact for data.augment flip or none, not crop_flip")
    if not path.is_file():
        raise ConfigError(f"{where}: {path} not found; make it with python -m hiap_core.train.teacher_logits")
    with safe_open(str(path), "pt") as f:
        metadata, logits = f.metadata() or {}, f.get_tensor("logits")
    if metadata.get("teacher_sha256") != teacher_sha256:
        raise ConfigError(f"{where}: made from another teacher's weights; remake it (the teacher_logits stage)")
    if metadata.get("images_sha256") != images_fingerprint(load_split(cfg.data, "train").images):
        raise ConfigError(f"{where}: made from other training images; remake it (the teacher_logits stage)")
    return logits


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--teacher", required=True, help="the dense run's folder (its model/)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    cfg = config_from_params(args.params, "finetune", {"teacher": args.teacher})
    print(f"teacher logits -> {compute(cfg, args.out)}")


if __name__ == "__main__":
    raise SystemExit(cli(main))
