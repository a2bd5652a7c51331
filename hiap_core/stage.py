"""`python hiap_core/stage.py [papermill options] NOTEBOOK OUTPUT [-p NAME VALUE ...]`: a notebook stage as
`dvc.yaml` runs it.

papermill's command line, with its failures said in one line: a notebook that raises prints the exception's
message and where the executed notebook keeps its traceback (papermill printed the cell's whole traceback,
40-70 lines, for a mistyped parameter), and Ctrl-C says how to go on (papermill printed a traceback of the
kernel's closed sockets). The exit status stays non-zero, so DVC stops at the stage.

Run as a script, not `-m hiap_core.stage`: importing the package loads torch, 2.6 s a stage in this process for
nothing (the kernel imports it anyway). Its folder leaves `sys.path`, so the package's modules shadow nothing.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from papermill.cli import papermill  # noqa: E402 (after the path fix above)
from papermill.exceptions import PapermillExecutionError  # noqa: E402

# the project's errors for bad input or a run that cannot go on: their message is the whole story
PROJECT_ERRORS = ("ConfigError", "DatasetError", "TrainingDiverged", "InfeasibleBudget")
INTERRUPTED = "interrupted: run `dvc repro` again; a run resumes from its last finished epoch, finished stages are kept"


def _interrupted(signum, frame) -> None:
    """Ctrl-C: leave at once. Unwinding papermill would shut the kernel down mid-cell, and the kernel then logs a
    traceback of its closed sockets; left alone it sees its parent gone and exits within a second, and every
    file a run writes is written atomically, so nothing half-written stays."""
    print(INTERRUPTED, file=sys.stderr, flush=True)
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, _interrupted)
    notebooks = [arg for arg in argv if arg.endswith(".ipynb")]  # papermill's two positional arguments
    output = notebooks[1] if len(notebooks) > 1 else "the output notebook"
    try:
        papermill.main(args=argv, prog_name="papermill", standalone_mode=False)
    except PapermillExecutionError as err:
        what = err.evalue if err.ename in PROJECT_ERRORS else f"{err.ename}: {err.evalue}"
        print(f"error: {what} (its traceback: cell {err.exec_count} of {output})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
