"""The study's stale training stages, N at a time, through submitit (its local executor on one machine,
SLURM on a cluster); `dvc repro` stays the entry point for everything else.

    python -m hiap_core.fanout --workers 2 --threads 1 [STAGE ...]        (make fanout WORKERS=2 THREADS=1)
    python -m hiap_core.fanout --gpus 0 1 2 3 [STAGE ...]                 (one run per GPU)
    python -m hiap_core.fanout --slurm PARTITION --workers 64 [STAGE ...] (one SLURM job per run)

DVC runs one stage at a time and holds its repository lock while it does (iterative/dvc#7419). Here DVC names
what is stale; the training stages among the targets (every stage that writes a run folder under
`data/runs/`, and nothing downstream of a stale stage outside them) are ordered into waves by their
dependencies (a baseline waits for its HiAP run), each wave's commands run as submitit jobs, and each stage
that finishes is recorded in this process with `dvc commit`, so the lock is only taken between jobs. A stage
is checked again just before it runs, as `dvc repro` does, so one whose inputs came out unchanged is skipped.
A job that dies loses only its own run (each run folder resumes from its checkpoint next time); the others
go on, and the command exits non-zero naming it. Afterwards `dvc repro` finds these stages up to date and runs
the rest (the reports and the timing stages). Job logs: `.fanout/`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import networkx as nx

RUNS_FOLDER = "data/runs/"
LOGS = ".fanout"


def run_stage(command: str, root: str, threads: int | None) -> None:
    """One stage's command in the repository, as `dvc repro` would run it (the venv's bin first on PATH), with
    `threads` CPU threads for torch (None: its default)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    subprocess.run(command, shell=True, cwd=root, env=env, check=True)


def plan(repo, targets: list[str]) -> list[list]:
    """The waves of training stages to run: stale ones among `targets` (all: every stage) and the training
    stages downstream of them, each wave after the stages it depends on."""
    graph = repo.index.graph  # edges: a stage -> the stages it depends on
    chosen = {s for t in targets for s in repo.stage.collect(t)} if targets else set(graph.nodes)
    training = {s for s in chosen if any(o.def_path.startswith(RUNS_FOLDER) for o in s.outs)}
    changed = repo.status()
    stale = {s for s in graph.nodes if s.addressing in changed}
    affected = stale | {s for s in graph.nodes if nx.descendants(graph, s) & stale}
    todo = {s for s in training & affected if not (nx.descendants(graph, s) & affected) - training}
    waves = []
    while todo:
        ready = {s for s in todo if not nx.descendants(graph, s) & todo}
        waves.append(sorted(ready, key=lambda s: s.addressing))
        todo -= ready
    return waves


def make_executor(args):
    import submitit

    if args.slurm:
        executor = submitit.AutoExecutor(folder=LOGS, cluster="slurm")
        gpus = {"gpus_per_node": 1} if args.gpus else {}
        executor.update_parameters(slurm_partition=args.slurm, cpus_per_task=args.threads or 1, timeout_min=args.timeout, **gpus)
    else:
        executor = submitit.LocalExecutor(folder=LOGS)
        executor.update_parameters(timeout_min=args.timeout)
    return executor


def fan_out(args) -> list[str]:
    """Run the plan's waves; returns the stages that failed (their runs resume next time)."""
    from dvc.repo import Repo

    root = str(Path.cwd())
    slots = [[g] for g in args.gpus] if args.gpus and not args.slurm else [[]] * args.workers
    executor, failed = make_executor(args), []
    with Repo(root) as repo:
        for number, wave in enumerate(plan(repo, args.targets), 1):
            print(f"wave {number}: {len(wave)} stages, {len(slots)} at a time", flush=True)
            pending, running, free = list(wave), {}, list(range(len(slots)))
            while pending or running:
                while pending and free:
                    stage = pending.pop(0)
                    if stage.addressing not in repo.status(targets=[stage.addressing]):
                        continue  # its inputs came out unchanged
                    slot = free.pop()
                    if slots[slot]:  # one local GPU per run
                        executor.update_parameters(visible_gpus=slots[slot], gpus_per_node=1)
                    running[executor.submit(run_stage, stage.cmd, root, args.threads)] = (stage, slot)
                    print(f"  started {stage.addressing}", flush=True)
                for job in [j for j in running if j.done()]:
                    stage, slot = running.pop(job)
                    free.append(slot)
                    try:
                        job.result()
                        repo.commit(stage.addressing, force=True)
                        print(f"  done {stage.addressing}", flush=True)
                    except Exception as err:  # the job's own log holds its traceback
                        failed.append(stage.addressing)
                        print(f"  FAILED {stage.addressing} ({type(err).__name__}; log: {job.paths.stderr})", flush=True)
                time.sleep(0.5)
            if failed:  # the next wave depends on this one
                break
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help="stages or stage groups (default: every stale training stage)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (with --gpus: one per GPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: torch's own)")
    parser.add_argument(
        "--gpus", type=int, nargs="*", default=[], help="GPU indices: one run per GPU (with --slurm: one GPU a job)"
    )
    parser.add_argument("--slurm", default=None, metavar="PARTITION", help="submit each run as a SLURM job")
    parser.add_argument("--timeout", type=int, default=24 * 60, help="minutes a run may take")
    args = parser.parse_args(argv)
    if args.workers < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--workers and --threads must be >= 1")
    failed = fan_out(args)
    if failed:
        print(f"error: {len(failed)} stages failed: {', '.join(failed)}; rerun to resume them", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
