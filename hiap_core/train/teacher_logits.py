"""The teacher's logits, computed once for every training image and its flip, so that no fine-tune runs the
teacher at every step (a KD step costs about 20% more than a dense step on a CPU; the study's 50-odd
fine-tunes share one teacher). `python -m hiap_core.train.teacher_logits --params params.yaml --teacher
data/runs/dense --out data/runs/dense_logits` (the `teacher_logits` stage); a run reads the file through
`teacher_logits` in its config (`data.load_teacher_logits`), which checks that it was made from its
teacher's weights and its images.
Exact only for augmentations that are a flip or nothing (`data.augment: flip | none`): a random crop is
not a finite set of views, so `crop_flip` runs refuse the cache."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save

from ..core.files import atomic_write
from .config import ConfigError, RunConfig, cli, config_from_params
from .data import LOGITS_FILE, NORMALIZATION, load_split, tensor_sha256
from .device import autocast, autocast_dtype
from .models import load_teacher, teacher_fingerprint
from .run_folder import check_writable

BATCH = 512


@torch.no_grad()
def compute(cfg: RunConfig, out: Path) -> Path:
    """Write `out/logits.safetensors`: the teacher's fp32 logits of every training image (row `2 * id`) and
    of its horizontal flip (row `2 * id + 1`), `id` its index in the training file."""
    if cfg.data.dataset == "imagenet":
        raise ConfigError("invalid config: data.dataset = 'imagenet': teacher logits are cached for the in-memory datasets")
    check_writable(out, "--out")  # before minutes of teacher forwards
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
    metadata = {
        "teacher_sha256": teacher_fingerprint(cfg),
        "images_sha256": tensor_sha256(pool.images),
        "logits_sha256": tensor_sha256(logits),
    }
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write(out / LOGITS_FILE, lambda p: p.write_bytes(save({"logits": logits}, metadata)))


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
