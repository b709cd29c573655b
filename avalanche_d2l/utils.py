"""Small shared helpers: module lookup by name, feature hooks, devices (and the package's one
seeding function, :func:`~avalanche_d2l.core.seeding.seed_everything`, re-exported)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from avalanche_d2l.core.seeding import seed_everything

__all__ = [
    "seed_everything",
    "get_module",
    "FeatureHook",
    "capture_features",
    "resolve_device",
    "quiet_replay_deprecation",
]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the sub-module of ``model`` at dotted path ``name``.

    Raises:
        ValueError: when no such module exists; the message lists the valid names.
    """
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    # Shallow names first: the layers users usually want (layer3, features, ...) must not be cut.
    valid = sorted((n for n in modules if n), key=lambda n: n.count("."))
    shown = ", ".join(valid[:60]) + (" ..." if len(valid) > 60 else "")
    raise ValueError(
        f"feature_layer={name!r} is not a module of {type(model).__name__}. "
        f"Pass one of its module names (model.named_modules()): {shown}"
    )


class FeatureHook:
    """Forward hook that keeps the latest output of one named module.

    The hook keeps the graph (no detach) so losses on the features reach the inputs.
    """

    def __init__(self, model: nn.Module, name: str):
        self.name = name
        self.module = get_module(model, name)
        self.output: torch.Tensor | None = None
        self._handle = self.module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output) -> None:
        if isinstance(output, (tuple, list)):
            output = output[0]
        self.output = output

    def pop(self) -> torch.Tensor:
        """Return the stored features and clear them."""
        if self.output is None:
            raise RuntimeError(
                f"layer {self.name!r} produced no output: was the model called after the hook "
                "was attached?"
            )
        out, self.output = self.output, None
        return out

    def remove(self) -> None:
        self._handle.remove()


@contextmanager
def capture_features(model: nn.Module, name: str) -> Iterator[FeatureHook]:
    """Context manager: ``with capture_features(m, "layer3") as h: m(x); f = h.pop()``."""
    hook = FeatureHook(model, name)
    try:
        yield hook
    finally:
        hook.remove()


@contextmanager
def training_mode(model: nn.Module, mode: bool) -> Iterator[nn.Module]:
    """Context manager: ``model.train(mode)`` inside; every submodule's own ``training`` flag is
    put back on exit (also on error), so mixed train/eval states survive."""
    modes = {name: m.training for name, m in model.named_modules()}
    model.train(mode)
    try:
        yield model
    finally:
        for name, m in model.named_modules():
            m.training = modes[name]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available else CPU; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def quiet_replay_deprecation() -> Iterator[None]:
    """Drop Avalanche 0.6's deprecation message of its replay buffer's ``update`` (one per
    experience, with the installation's path). It is raised through Avalanche's ``deprecated``,
    which puts its own ``simplefilter("once")`` in front of every filter on each call, so a filter
    cannot silence it; the display function can."""
    import warnings

    show = warnings.showwarning

    def quiet(message, *args, **kwargs):
        if "Call to deprecated function update" not in str(message):
            show(message, *args, **kwargs)

    warnings.showwarning = quiet
    try:
        yield
    finally:
        warnings.showwarning = show
