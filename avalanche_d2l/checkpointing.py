"""Strategy checkpoints: Avalanche's dill-based checkpointing, written atomically.

Two things are added to :mod:`avalanche.checkpointing`:

* the file is written to a temporary name and renamed (:func:`~avalanche_d2l.core.storage.
  atomic_write`), so a run killed while saving never leaves a truncated checkpoint behind (a
  truncated file would make the resume fail);
* Avalanche's format is a full (dill) unpickling, which runs whatever code a file names. The
  digest of every checkpoint this package writes is recorded beside it (``<name>.sha256``), and a
  checkpoint is only unpickled when its bytes match that record: a file planted or altered in the
  output folder is refused (:class:`UntrustedCheckpoint`) before anything in it runs;
* a failed write (a full disk: torch raises ``RuntimeError``, not ``OSError``) is one
  :class:`OSError` sentence, and its temporary file is removed;
* ``torch.optim`` deletes its submodule attributes (``torch.optim.adam`` ...). dill then cannot find
  the optimiser classes by name and tries to pickle them by value, which fails. The submodules are
  put back as attributes before saving so the classes pickle by reference, as pickle itself does.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from avalanche_d2l.core.storage import atomic_write

__all__ = ["save_strategy", "load_strategy", "remove_checkpoint", "UntrustedCheckpoint"]


_THEN = "run the same command again to resume"


class UntrustedCheckpoint(ValueError):
    """A checkpoint whose bytes do not match the digest recorded when it was written."""


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _expose_torch_optim_submodules() -> None:
    prefix = "torch.optim."
    for name, module in list(sys.modules.items()):
        if name.startswith(prefix) and "." not in name[len(prefix) :] and module is not None:
            if not hasattr(torch.optim, name[len(prefix) :]):
                setattr(torch.optim, name[len(prefix) :], module)


def save_strategy(strategy, path: str | os.PathLike) -> None:
    """Save the whole strategy (model, optimiser, plugins, evaluator) to ``path`` atomically."""
    from avalanche.checkpointing import save_checkpoint

    _expose_torch_optim_submodules()
    path = Path(path)

    def write(tmp: Path) -> None:
        save_checkpoint(strategy, str(tmp))
        # the record first: a checkpoint on disk always has its record (a kill between the two
        # renames leaves the old checkpoint with a new record, which is refused and redone)
        atomic_write(
            _digest_path(path), _digest(tmp) + "\n", what="the checkpoint record", then=_THEN
        )

    atomic_write(path, write, what="the checkpoint", then=_THEN)


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Remove a checkpoint written by :func:`save_strategy` and its digest record (if any)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    _digest_path(path).unlink(missing_ok=True)


def load_strategy(strategy, path: str | os.PathLike, map_location=None):
    """Restore ``strategy`` from ``path`` if it exists (only a file :func:`save_strategy` wrote,
    unchanged since: see :class:`UntrustedCheckpoint`).

    Returns:
        ``(strategy, next_experience)``; ``(strategy, 0)`` when there is no checkpoint.
    """
    from avalanche.checkpointing import maybe_load_checkpoint

    path = Path(path)
    if path.exists():
        record = _digest_path(path)
        recorded = record.read_text().strip() if record.exists() else None
        if recorded != _digest(path):
            raise UntrustedCheckpoint(
                f"{path} was not written by this package or was changed since (its digest does "
                f"not match {record.name}); it was not unpickled"
            )
    _expose_torch_optim_submodules()
    return maybe_load_checkpoint(strategy, str(path), map_location=map_location)
