"""What a notebook reads from `params.yaml`. The study's notebooks name the groups they use in their
parameters cell with the value None; `study_params` fills each None from `params.yaml`, so "Run All" in
JupyterLab works with no injected parameters, and a value papermill injects (`-p`, `-y`) wins over the file.
The DVC stages inject no groups: each notebook reads the groups it names, and `tests/test_dvc.py` checks
that its stage tracks them."""

from __future__ import annotations

from pathlib import Path

from .config import load_params
from .paths import PARAMS


def read_params(path: Path = PARAMS) -> dict:
    """The whole of `params.yaml` (the project's, anchored at its root); a malformed file is one line."""
    return load_params(path)


def study_params(path: Path = PARAMS, **groups) -> tuple:
    """The value of each named top-level key of `params.yaml`, in the order given, unless the caller
    already holds one (not None): `data, model = study_params(data=data, model=model)`. An unknown key
    is an error naming it, not a silent empty group."""
    missing = [name for name, value in groups.items() if value is None]
    params = read_params(path) if missing else {}
    unknown = [name for name in missing if name not in params]
    if unknown:
        raise KeyError(f"{path} has no {', '.join(unknown)} (its keys: {', '.join(params)})")
    return tuple(params[name] if value is None else value for name, value in groups.items())


def main() -> None:
    """`python -m hiap_core.train.params [FILE]`: check a params file (keys and the study's cross-references)
    in one line, before `dvc repro` builds a pipeline on it."""
    import sys

    from .config import check_params, cli

    path = Path(sys.argv[1]) if len(sys.argv) > 1 else PARAMS

    def check() -> None:
        check_params(load_params(path))
        print(f"{path}: ok")

    raise SystemExit(cli(check))


if __name__ == "__main__":
    main()
