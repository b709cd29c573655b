"""Strategy checkpoints: Avalanche's dill-based checkpointing, written atomically.

Two things are added to :mod:`avalanche.checkpointing`:

* the file is written to a temporary name and renamed, so a run killed while saving never leaves a
  truncated checkpoint behind (a truncated file would make the resume fail);
* ``torch.optim`` deletes its submodule attributes (``torch.optim.adam`` ...). dill then cannot find
  the optimiser classes by name and tries to pickle them by value, which fails. The submodules are
  put back as attributes before saving so the classes pickle by reference, as pickle itself does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

__all__ = ["save_strategy", "load_strategy"]


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
    tmp = path.with_name(path.name + ".tmp")
    save_checkpoint(strategy, str(tmp))
    os.replace(tmp, path)


def load_strategy(strategy, path: str | os.PathLike, map_location=None):
    """Restore ``strategy`` from ``path`` if it exists.

    Returns:
        ``(strategy, next_experience)``; ``(strategy, 0)`` when there is no checkpoint.
    """
    from avalanche.checkpointing import maybe_load_checkpoint

    _expose_torch_optim_submodules()
    return maybe_load_checkpoint(strategy, str(path), map_location=map_location)
