"""What a GAN phase on a frozen classifier's features needs around the trainer: the frozen copy,
the feature tap that stops the forward pass at the feature layer, endless batches of real images
with a resumable position, atomic checkpoint writes and a module's fingerprint."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from contextlib import contextmanager
from copy import deepcopy
from typing import Any

import torch
from torch import nn

from avalanche_d2l.utils import FeatureHook

__all__ = [
    "ConvStats",
    "FeatureTap",
    "RealBatches",
    "atomic_torch_save",
    "channels_last_on_cpu",
    "device_layout",
    "feature_shape",
    "frozen_copy",
    "module_fingerprint",
]


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in eval mode with every parameter frozen."""
    copy = deepcopy(module).eval()
    copy.requires_grad_(False)
    return copy


def channels_last_on_cpu(module: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """``module`` with its 4-D weights in channels-last memory format when it lives on the CPU
    (in place; returned for chaining); otherwise, or where the check fails, ``module`` unchanged.

    On CPU with one thread a small CNN's forward and backward in channels-last run about twice
    as fast as in the default layout, max pooling about 7x (``benchmarks/genifer_layout.py``).
    With ``example`` (a batch the module takes), the layout is changed only if a copy of the
    module gives a tensor that is the same within float tolerance in both layouts, in eval mode
    and in train mode (the teacher runs in either; the same random state for both layouts); a
    user's model that, e.g., calls ``.view`` on a convolution's output (which channels-last
    cannot give) is left as it was. The check runs on a deep copy without gradients, so
    ``module``'s modes and batch-norm statistics are untouched.
    """
    params = list(module.parameters()) + list(module.buffers())
    if not params or any(p.device.type != "cpu" for p in params):
        return module
    if not any(p.dim() == 4 for p in params):
        return module
    if example is None or _same_in_channels_last(module, example):
        module.to(memory_format=torch.channels_last)
    return module


def _same_in_channels_last(module: nn.Module, example: torch.Tensor) -> bool:
    """Whether a copy of ``module`` gives the same tensor on ``example`` in both layouts, in eval
    and in train mode."""
    for train in (False, True):
        outs = []
        for layout in (torch.contiguous_format, torch.channels_last):
            copy = deepcopy(module).train(train).to(memory_format=layout)
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)  # the same dropout masks in both layouts
                    outs.append(copy(example))
            except Exception:  # noqa: BLE001 - any failure means: keep the default layout
                return False
        ref, out = outs
        if not (torch.is_tensor(ref) and torch.is_tensor(out) and ref.shape == out.shape):
            return False
        tol = 1e-4 * max(1.0, float(ref.abs().max()))
        if not torch.allclose(out.float(), ref.float(), rtol=1e-3, atol=tol):
            return False
    return True


def device_layout(module: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Our own conv modules (the generator), moved to ``device`` when given, in the layout
    measured fastest where they live: channels-last on the CPU (:func:`channels_last_on_cpu`),
    the default layout elsewhere. In place; returned for chaining. Every move of the generator
    goes through here. Anything that is not a module (a stand-in sampler) is only moved."""
    if device is not None:
        module.to(device)
    if not isinstance(module, nn.Module):
        return module
    params = list(module.parameters())
    if params and all(p.device.type == "cpu" for p in params):
        return channels_last_on_cpu(module)
    return module.to(memory_format=torch.contiguous_format)


def module_fingerprint(module: nn.Module) -> str:
    """A short hash of a module's state (to check that a checkpoint belongs to it)."""
    h = hashlib.sha1()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`avalanche_d2l.core.storage.atomic_write` (a temporary file
    named by the writing process, renamed; a failed write is one sentence)."""
    from avalanche_d2l.core.storage import atomic_write

    atomic_write(path, lambda tmp: torch.save(obj, tmp), what="the GAN checkpoint")


class _StopForward(Exception):
    """Raised by :class:`FeatureTap` to skip the classifier layers after the feature layer."""


class FeatureTap(FeatureHook):
    """Feature hook that stops the forward pass right after the hooked layer (saves the rest);
    :meth:`with_output` runs the whole model and returns its output as well."""

    _stop = True

    def _hook(self, module: nn.Module, inputs, output) -> None:
        super()._hook(module, inputs, output)
        if self._stop:
            raise _StopForward

    @contextmanager
    def passing(self):
        """While inside, forward passes run the whole model (the tap still records); the
        recorded output is dropped on the way out."""
        self._stop = False
        try:
            yield self
        finally:
            self._stop = True
            self.output = None

    def with_output(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The features and the model's own output for ``x`` (one full forward pass)."""
        with self.passing():
            out = model(x)
            return self.pop(), out

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        try:
            model(x)
        except _StopForward:
            pass
        return self.pop()


class ConvStats:
    """Per-channel mean and standard deviation of every ``nn.Conv2d`` output of a classifier, in
    the order the convolutions run, up to the output of the module ``until`` (the feature layer:
    a pass that goes on to the logits collects the same layers as one a :class:`FeatureTap`
    stops there; build this before the tap, so a conv feature layer is counted either way).

    Collects only while :attr:`active`, and from each :meth:`take` until ``until`` has run; the
    statistics keep the graph, so a distance between a fake batch's and a real batch's reaches
    the generator.
    """

    def __init__(self, model: nn.Module, until: nn.Module | None = None):
        self.active = False
        self._past_until = False
        self._stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handles = [
            m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, nn.Conv2d)
        ]
        self._until = until.register_forward_hook(self._until_hook) if until is not None else None

    def _until_hook(self, module: nn.Module, inputs, output) -> None:
        self._past_until = True

    @property
    def layers(self) -> int:
        """The number of convolutions watched (all of the model's; ``until`` may end it sooner)."""
        return len(self._handles)

    def _hook(self, module: nn.Module, inputs, output) -> None:
        if self.active and not self._past_until:
            out = output.float()
            self._stats.append((out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3))))

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The statistics collected since the last call (and clear them)."""
        out, self._stats = self._stats, []
        self._past_until = False
        return out

    @staticmethod
    def distance(
        fake: Sequence[tuple[torch.Tensor, torch.Tensor]],
        real: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Mean over layers of ``mean_c(|mu_f - mu_r| + |sd_f - sd_r|) / mean_c(sd_r)``: each
        layer's mismatch in units of its real spread, so no layer's scale dominates."""
        if len(fake) != len(real) or not fake:
            raise RuntimeError("ConvStats: the fake and the real pass saw different layers")
        terms = []
        for (mu_f, sd_f), (mu_r, sd_r) in zip(fake, real, strict=True):
            scale = sd_r.detach().mean() + 1e-6
            terms.append(
                ((mu_f - mu_r.detach()).abs() + (sd_f - sd_r.detach()).abs()).mean() / scale
            )
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for h in [*self._handles, *([self._until] if self._until is not None else [])]:
            h.remove()
        self._handles, self._until = [], None


def feature_shape(classifier: nn.Module, layer: str, image_shape: Sequence[int]) -> tuple:
    """Shape of one sample's output of ``layer`` for images of ``image_shape`` (C, H, W)."""
    device = next(classifier.parameters()).device
    tap = FeatureTap(classifier, layer)
    was_training = classifier.training
    try:
        classifier.eval()
        with torch.no_grad():
            feat = tap(classifier, torch.zeros(2, *image_shape, device=device))
    finally:
        tap.remove()
        classifier.train(was_training)
    return tuple(int(s) for s in feat.shape[1:])


class RealBatches:
    """Endless batches ``(images, labels)`` of a dataset (eval transforms), with a state.

    Small datasets are loaded once as tensors (freed with this object) and drawn without
    replacement in random order; large ones are streamed by a seeded DataLoader. The position
    can be saved and restored (:meth:`state_dict`), which mid-phase checkpoints need.
    """

    def __init__(
        self, dataset, batch_size: int, device: torch.device, rng: torch.Generator, cache_mb: float
    ):
        self.ds = dataset.eval() if hasattr(dataset, "eval") else dataset
        self.n = batch_size
        self.device = device
        self.rng = rng
        x0 = self.ds[0][0]
        self.cached = len(self.ds) * x0.numel() * 4 <= cache_mb * 2**20
        self.perm: torch.Tensor | None = None
        self.pos = 0
        if self.cached:
            xs, ys = [], []
            for batch in torch.utils.data.DataLoader(self.ds, batch_size=512, shuffle=False):
                xs.append(batch[0])
                ys.append(batch[1])
            self.xs = torch.cat(xs).to(device)
            self.ys = torch.cat(ys).long().to(device)
        else:
            seed = int(torch.randint(2**31, (1,), generator=rng))
            self.loader_rng = torch.Generator().manual_seed(seed)
            self.loader = torch.utils.data.DataLoader(
                self.ds,
                batch_size=batch_size,
                shuffle=True,
                drop_last=len(self.ds) >= batch_size,
                generator=self.loader_rng,
            )
            self._epoch_state = self.loader_rng.get_state()
            self._it = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cached:
            total, n = len(self.ys), self.n
            if total < n:
                idx = torch.randint(total, (n,), generator=self.rng).to(self.device)
                return self.xs[idx], self.ys[idx]
            if self.perm is None or self.pos + n > total:
                self.perm = torch.randperm(total, generator=self.rng).to(self.device)
                self.pos = 0
            idx = self.perm[self.pos : self.pos + n]
            self.pos += n
            return self.xs[idx], self.ys[idx]
        try:
            batch = next(self._it)
        except StopIteration:
            self._epoch_state = self.loader_rng.get_state()
            self.pos = 0
            self._it = iter(self.loader)
            batch = next(self._it)
        self.pos += 1
        return batch[0].to(self.device), batch[1].long().to(self.device)

    def state_dict(self) -> dict[str, Any]:
        if self.cached:
            return {
                "cached": True,
                "pos": self.pos,
                "perm": None if self.perm is None else self.perm.cpu(),
            }
        return {"cached": False, "pos": self.pos, "epoch_state": self._epoch_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["cached"] != self.cached:
            raise ValueError(
                "the checkpoint's real-batch state is for another caching mode: keep "
                "gan.real_cache_mb unchanged when resuming a GAN phase"
            )
        self.pos = int(state["pos"])
        if self.cached:
            self.perm = None if state["perm"] is None else state["perm"].to(self.device)
            return
        self._epoch_state = state["epoch_state"]
        self.loader_rng.set_state(self._epoch_state)
        self._it = iter(self.loader)
        for _ in range(self.pos):  # skip the batches already used in this epoch
            next(self._it)

    def close(self) -> None:
        self.xs = self.ys = None  # type: ignore[assignment]
