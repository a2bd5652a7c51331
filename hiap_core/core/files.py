"""Atomic file writes (a reader, or a killed run, never sees half a checkpoint, model or report), file hashes,
and an exclusive lock a process holds on a folder while it writes there."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary file next to `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from the other users of a shared machine
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_leftover_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files of `atomic_write`s a killed process left under `folder` (call it holding the
    folder's lock: no live writer's file goes); returns them."""
    leftovers = [p for p in Path(folder).rglob(".*.tmp*") if p.is_file()]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def _umask() -> int:
    """The process umask (read by setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()  # hashlib.file_digest needs Python 3.11; the project supports 3.10
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


class LockHeld(RuntimeError):
    """Another live process holds the lock; `holder` is its pid as it wrote it."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by process {holder}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, wait: Callable[[str], object] | None = None):
    """Hold an exclusive lock on `path` (created if absent, holding the holder's pid) for the block. If a live
    process holds it: `LockHeld`, or with `wait`, call `wait(holder)` and block until it is free. The OS
    drops a lock with its process, so a killed holder's is taken over."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        if wait is None:
            os.close(fd)
            raise LockHeld(path, holder) from None
        wait(holder)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the lock
