"""Genifer's replay during training: old-class images from the frozen EMA generator, as tensors
per mini-batch, the frozen teacher's outputs on them, and their place in the mini-batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from avalanche_d2l.genifer.config import ReplaySettings
from avalanche_d2l.models.gan import StyleGenerator
from avalanche_d2l.utils import FeatureHook, get_module, training_mode

__all__ = [
    "ReplayDetach",
    "crop_flip",
    "join_batch",
    "replay_sizes",
    "sample_replay",
    "teacher_outputs",
]


def replay_sizes(batch: int, settings: ReplaySettings) -> tuple[int, int]:
    """``(replayed, real)`` images of a mini-batch of ``batch`` real images: replayed images
    replace part of it (``settings.split``) or are appended (``settings.ratio`` per real one)."""
    if settings.split is not None:
        n = max(1, int(settings.split * batch))
        return n, max(1, batch - n)
    return max(1, round(batch * settings.ratio)), batch


@torch.no_grad()
def sample_replay(
    generator: StyleGenerator,
    classes: Sequence[int],
    n: int,
    settings: ReplaySettings,
    rng: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of ``classes`` (labels drawn uniformly) from ``generator``, clamped to its
    value range, randomly cropped and flipped; returns ``(images, labels)``."""
    labels = generator.sample_labels(n, classes, generator=rng)
    x = generator.generate(n, labels, generator=rng)
    x = crop_flip(
        generator.clamp(x),
        pad=settings.crop_pad,
        padding=settings.padding,
        flip=settings.flip,
        low=generator.range_low,
        rng=rng,
    )
    return x, labels


@torch.no_grad()
def teacher_outputs(
    teacher: nn.Module,
    layer: str,
    x_real: torch.Tensor,
    x_replay: torch.Tensor,
    bn: str,
    *,
    real_features: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The teacher's logits and ``layer`` features on ``x_replay``, and with ``real_features``
    its ``layer`` features on ``x_real`` (else ``None``): in eval mode (``bn="eval"``; on the
    replay alone unless the real features are asked for), or in train mode on the whole mixed
    batch (``"train"``, reference)."""
    hook = FeatureHook(teacher, layer)
    n_real = x_real.shape[0]
    try:
        if bn == "train" or real_features:
            with training_mode(teacher, bn == "train"):
                logits = teacher(torch.cat([x_real, x_replay]))[n_real:]
                feats = hook.pop()
            feats_real, feats = feats[:n_real], feats[n_real:]
        else:
            logits = teacher(x_replay)
            feats, feats_real = hook.pop(), None
    finally:
        hook.remove()
    return logits, feats, feats_real if real_features else None


class ReplayDetach:
    """Forward hook on the feature layer: the rows from ``n_real`` on (the replayed images)
    leave it detached, so the layers up to it learn from the real images only and the replay
    trains the layers above it (the reference's ``feat_dist_loss_type="onlycurr"``)."""

    def __init__(self, model: nn.Module, layer: str, n_real: int):
        self.n_real = n_real
        self._handle = get_module(model, layer).register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output):
        if not torch.is_tensor(output):
            raise TypeError(
                "replay.trunk_from_replay=False needs a feature layer whose output is one "
                f"tensor, got {type(output).__name__}: choose another feature_layer"
            )
        n = self.n_real
        return torch.cat([output[:n], output[n:].detach()])

    def remove(self) -> None:
        self._handle.remove()


def join_batch(mb: list[torch.Tensor], x: torch.Tensor, labels: torch.Tensor) -> list:
    """The mini-batch ``mb`` (images, labels, task labels, ...) with ``x`` / ``labels`` appended;
    other per-sample fields repeat their first value."""
    n = x.shape[0]
    out = [torch.cat([mb[0], x]), torch.cat([mb[1], labels.to(mb[1].device, mb[1].dtype)])]
    out += [torch.cat([t, t[:1].expand(n, *t.shape[1:])]) for t in mb[2:]]
    return out


def crop_flip(
    x: torch.Tensor,
    *,
    pad: int,
    padding: str,
    flip: bool,
    low: torch.Tensor,
    rng: torch.Generator,
) -> torch.Tensor:
    """Random crop (padded by ``pad`` px with ``low``, ``padding="constant"``, or the border
    pixels, ``"edge"``) and horizontal flip, drawn per image."""
    n, c, h, w = x.shape
    if pad > 0:
        if padding == "edge":
            xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        else:
            low = low.to(x).view(1, -1, 1, 1) if low.dim() == 1 else low.to(x)
            xp = F.pad(x - low, (pad, pad, pad, pad)) + low
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=rng).to(x.device)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=rng).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        idx_n = torch.arange(n, device=x.device)[:, None, None, None]
        idx_c = torch.arange(c, device=x.device)[None, :, None, None]
        x = xp[idx_n, idx_c, rows, cols]
    if flip:
        hit = (torch.rand(n, generator=rng) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(hit, x.flip(3), x)
    return x
