"""How to spend 2 cores on the study's fine-tunes: 2 runs at a time with 1 thread each, against 1 run at a time
with 2 threads, over the same 8 HiAP fine-tunes of the default study (4 budgets x 2 seeds); and how the same
runs differ between the two thread counts (weights' bits, architecture, accuracy, landing).

    python -m hiap_core.measure.fanout_threads      (after `dvc repro teacher_logits`; about 30 min on 2 cores)

Each run is the CLI training command in its own process, as a fan-out job runs it (`hiap_core.fanout.run_stage`,
`OMP_NUM_THREADS` per run), into a scratch folder. The two settings run one after the other, so run it on a quiet
machine. Writes reports/benchmarks/fanout_threads.json."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..core.files import atomic_write, file_sha256
from ..core.pruned import WEIGHTS_FILE, load_spec, spec_sha256
from ..fanout import run_stage
from ..train.params import read_params
from ..train.paths import PROJECT_ROOT, REPORTS
from ..train.runs import run_overrides

BUDGETS = ("moderate", "steep", "harsh", "extreme")
SEEDS = (0, 1)
RUNS = [(budget, seed) for budget in BUDGETS for seed in SEEDS]  # the 8 fine-tunes, in the order they start
SETTINGS = {"2 workers x 1 thread": (2, 1), "1 worker x 2 threads": (1, 2)}


def commands(params: dict, folder: Path) -> list[str]:
    """The CLI command of each of the 8 fine-tunes, writing under `folder`."""
    runs = []
    for budget, seed in RUNS:
        overrides = run_overrides(params, "hiap", teacher="dense", budget=budget, seed=seed)
        sets = " ".join(shlex.quote(f"{key}={value}") for key, value in overrides.items())
        out = shlex.quote(f"{folder}/{budget}_s{seed}")
        runs.append(f"{shlex.quote(sys.executable)} -m hiap_core.train --method hiap --out {out} --set {sets}")
    return runs


def timed(command: str, threads: int) -> float:
    start = time.perf_counter()
    run_stage(command, str(PROJECT_ROOT), threads)
    return time.perf_counter() - start


def outcome(run: Path) -> dict:
    """What a finished run produced: its accuracies, landing, architecture and the sha256 of its weights."""
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "test_acc": metrics["test_acc"],
        "val_acc": metrics["val_acc"],
        "macs_fraction": metrics["macs_fraction"],
        "spec_sha256": spec_sha256(load_spec(run / "model")),
        "weights_sha256": file_sha256(run / "model" / WEIGHTS_FILE),
    }


def measure(workers: int, threads: int, params: dict) -> dict:
    """Wall time of the 8 fine-tunes, `workers` at a time with `threads` each, each run's own time and outcome."""
    with tempfile.TemporaryDirectory(prefix="fanout_threads_") as folder:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            per_run = list(pool.map(lambda c: timed(c, threads), commands(params, Path(folder))))
        return {
            "workers": workers,
            "threads": threads,
            "wall_s": round(time.perf_counter() - start, 1),
            "run_s": [round(t, 1) for t in per_run],
            "outcomes": [outcome(Path(folder) / f"{budget}_s{seed}") for budget, seed in RUNS],
        }


def thread_spread(one_thread: list[dict], two_threads: list[dict]) -> dict:
    """How the same runs differ between thread counts: the bits, the architecture, the accuracy and the landing."""
    pairs = list(zip(one_thread, two_threads))
    return {
        "identical_weights": sum(a["weights_sha256"] == b["weights_sha256"] for a, b in pairs),
        "identical_architecture": sum(a["spec_sha256"] == b["spec_sha256"] for a, b in pairs),
        "runs": len(pairs),
        "max_abs_test_acc_diff_pts": round(100 * max(abs(a["test_acc"] - b["test_acc"]) for a, b in pairs), 2),
        "max_abs_val_acc_diff_pts": round(100 * max(abs(a["val_acc"] - b["val_acc"]) for a, b in pairs), 2),
        "max_abs_macs_fraction_diff": round(max(abs(a["macs_fraction"] - b["macs_fraction"]) for a, b in pairs), 5),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPORTS / "benchmarks" / "fanout_threads.json")
    args = parser.parse_args(argv)
    params = read_params()
    results = {}
    for name, (workers, threads) in SETTINGS.items():
        results[name] = measure(workers, threads, params)
        print(f"{name}: {results[name]['wall_s']} s for {len(RUNS)} fine-tunes", flush=True)
    two, one = (results[name]["wall_s"] for name in SETTINGS)
    spread = thread_spread(*(results[name]["outcomes"] for name in SETTINGS))
    report = {
        "runs": [f"hiap_{budget}_s{seed}" for budget, seed in RUNS],
        "settings": results,
        "speedup_of_2x1_over_1x2": round(one / two, 3),
        "one_vs_two_threads": spread,  # the determinism contract across thread counts (README)
    }
    atomic_write(args.out, lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    print(f"2 workers x 1 thread are {one / two:.2f}x as fast as 1 worker x 2 threads -> {args.out}")
    print(f"1 against 2 threads: {json.dumps(spread)}")


if __name__ == "__main__":
    main()
