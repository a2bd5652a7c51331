"""`python -m hiap_core.train --method METHOD --out FOLDER [--set ...]` (METHOD: one of `config.METHODS`)
(resumable; `torchrun --nproc_per_node=N -m hiap_core.train ...` for DDP)."""

from __future__ import annotations

import argparse
import sys

import torch

from .config import METHODS, ConfigError, config_from_params
from .data import DatasetError
from .engine import TrainingDiverged, train
from .paths import PARAMS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train a dense, HiAP or baseline ViT (resumable; torchrun for DDP).")
    parser.add_argument("--params", default=str(PARAMS), help="params file (default: the project's params.yaml)")
    parser.add_argument("--method", required=True, help=" | ".join(METHODS))
    parser.add_argument("--out", required=True, help="run folder (checkpoint, reports, model/)")
    parser.add_argument(  # `--set a=1 b=2` and `--set a=1 --set b=2` alike: every one counts
        "--set", nargs="*", action="extend", default=[], metavar="FIELD=VALUE", help="overrides, e.g. hiap.lambda_macro=4"
    )
    args = parser.parse_args(argv)
    try:
        cfg = config_from_params(args.params, args.method, [f"out={args.out}", *args.set])
        train(cfg)
    except (ConfigError, DatasetError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a disk that fills up or a folder made read-only during the run
        print(f"error: cannot write the run's files: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # torch.save reports a full disk as an enforce failure of its zip writer
        if "inline_container" not in str(err) and "write" not in str(err).lower():
            raise
        print(f"error: cannot write the run's files (disk full?): {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to resume {args.out} from its last finished epoch", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
