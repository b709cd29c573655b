"""One command per output folder: ``OUT/.lock`` is held (``flock``) while a command writes there.

Two commands writing into one ``--out`` would share checkpoint names and overwrite each other's
``results.json``. The second one stops before any work with one sentence naming the first (its
process id, start time and command line). The lock is the kernel's: it goes with the process, so a
killed command never leaves a stale lock behind.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover -- not on Linux/macOS: no locking
    fcntl = None

__all__ = ["OutputLock", "FolderInUse", "holds_output_lock"]

LOCK_NAME = ".lock"


class FolderInUse(ValueError):
    """Another command holds the output folder."""


class OutputLock:
    """Exclusive lock of an output folder for the life of a ``with`` block."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        if fcntl is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise FolderInUse(
                    f"{self.path.parent} is in use by another command ({holder}); wait for it "
                    "to finish, or pass another --out"
                ) from None
            # the holder removes the file when it is done: a lock taken on a file that was
            # removed meanwhile locks nothing, so take it again on the file now at the path
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()}, started {started}: {' '.join(sys.argv)}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            # removed while still held (see __enter__), so a finished folder has no lock file
            self.path.unlink(missing_ok=True)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def holds_output_lock(fn):
    """Decorate a function with an ``out=`` keyword: the folder is created, checked and locked
    (in the main process only: the other processes of a distributed run share the main's lock)
    for the duration of the call."""

    @functools.wraps(fn)
    def wrapper(*args, out, **kwargs):
        from avalanche_d2l.experiments import runner

        out = runner.check_out_dir(Path(out))
        if not runner.is_main_process():
            return fn(*args, out=out, **kwargs)
        with OutputLock(out):
            return fn(*args, out=out, **kwargs)

    return wrapper
