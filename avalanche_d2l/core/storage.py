"""Files written whole or not at all, and unreadable files set aside.

Every result, run record, cache and checkpoint of the package is written by :func:`atomic_write`:
the bytes go to a hidden temporary file beside the target, named after the writing process
(``.<name>.<pid>.tmp``, so two processes never share one), which is then renamed over the
target in one step. A reader sees the old file or the new one, never half of one. A failed write
(a full disk: ``torch.save`` raises ``RuntimeError``, not ``OSError``) removes the temporary file
and is one :class:`WriteFailed` sentence.

A file that cannot be read back is moved aside by :func:`set_aside` (``<name>.corrupt``) and
redone, so the user keeps it for inspection and the next run does not trip over it again.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["WriteFailed", "atomic_write", "set_aside", "temporary_name"]


class WriteFailed(OSError):
    """A file could not be written (the message says which and what to do)."""


def temporary_name(path: str | os.PathLike) -> Path:
    """The hidden temporary sibling this process writes ``path`` through."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(
    path: str | os.PathLike,
    data: str | bytes | Callable[[Path], object],
    *,
    what: str = "",
    then: str = "run the same command again",
) -> Path:
    """Write ``path`` through a temporary sibling and a rename (the folder is created if missing).

    Args:
        path: the file to write.
        data: text, bytes, or a function that writes the file it is given (e.g.
            ``lambda tmp: torch.save(obj, tmp)``).
        what: how the message names the file (``"the checkpoint"``); the path follows it.
        then: what the user does after freeing disk space.

    Returns:
        ``path``.

    Raises:
        WriteFailed: the file could not be written; the temporary file was removed.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(data):
            data(tmp)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    except WriteFailed:
        tmp.unlink(missing_ok=True)
        raise
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        name = f"{what} {path}" if what else str(path)
        raise WriteFailed(f"could not write {name} ({err}); free disk space and {then}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def set_aside(path: str | os.PathLike, label: str = "corrupt", *, stamped: bool = False) -> Path:
    """Move ``path`` (a file or a folder) to a sibling named after it and return the new path.

    Args:
        path: what to move.
        label: the suffix: ``<name>.<label>`` (a file set aside earlier under that name is
            replaced).
        stamped: name it ``<name>.<label>-<date>-<time>`` instead (a random tail when that is
            taken), so earlier ones are kept; for folders, which cannot be renamed over.
    """
    path = Path(path)
    if not stamped:
        aside = path.with_name(f"{path.name}.{label}")
        os.replace(path, aside)
        return aside
    aside = path.with_name(f"{path.name}.{label}-{time.strftime('%Y%m%d-%H%M%S')}")
    if aside.exists():
        aside = aside.with_name(f"{aside.name}-{uuid.uuid4().hex[:6]}")
    os.rename(path, aside)
    return aside
