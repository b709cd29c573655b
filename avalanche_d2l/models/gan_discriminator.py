"""Genifer's discriminator on classifier features (:mod:`avalanche_d2l.models.gan`): it never
reads pixels; convolutions and average pools down to 2x2, the minibatch standard deviation and a
projection on the label."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .gan_layers import EqualConv2d, EqualLinear, ReferenceConv2d, _lrelu, _normalize_2nd_moment

__all__ = ["DiscriminatorConfig", "FeatureDiscriminator"]

_FAMILIES_D = ("compact", "reference")


@dataclass
class DiscriminatorConfig:
    """Architecture of :class:`FeatureDiscriminator`.

    Attributes:
        feature_shape: shape of one sample's features at the hooked layer: ``(C, H, W)`` for a
            map or ``(D,)`` for a vector.
        num_classes: number of labels for the projection conditioning.
        channels: width of every layer.
        mbstd_group: group size of the minibatch standard-deviation layer.
        cmap_dim: size of the projection space (defaults to ``channels``).
        family: ``"compact"`` or ``"reference"`` (see the module docstring).
    """

    feature_shape: tuple[int, ...] = (64, 4, 4)
    num_classes: int = 10
    channels: int = 64
    mbstd_group: int = 4
    cmap_dim: int | None = None
    family: str = "compact"

    def __post_init__(self) -> None:
        self.feature_shape = tuple(int(v) for v in self.feature_shape)
        if self.family not in _FAMILIES_D:
            raise ValueError(
                f"discriminator family must be one of {_FAMILIES_D}, got {self.family!r}"
            )


class _LReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, 0.2)


class _MinibatchStd(nn.Module):
    """Appends the standard deviation of features over small groups of the batch (one channel)."""

    def __init__(self, group_size: int):
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        g = min(self.group_size, n)
        while n % g:  # the largest group size <= group_size that divides the batch
            g -= 1
        y = x.reshape(g, -1, *x.shape[1:]).float()
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt()
        y = y.reshape(y.shape[0], -1).mean(dim=1)  # one value per group
        y = y.reshape(-1, *([1] * (x.dim() - 1))).repeat(g, *([1] * (x.dim() - 1)))
        shape = (n, 1, *x.shape[2:])
        return torch.cat([x, y.to(x.dtype).expand(shape)], dim=1)


class FeatureDiscriminator(nn.Module):
    """Discriminator on classifier features with projection label conditioning.

    ``forward(features, labels)`` returns one logit per sample. Inputs whose shape is not the
    configured ``feature_shape`` raise a ``ValueError``: this network never reads pixels.
    """

    def __init__(self, *, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        shape = tuple(int(s) for s in config.feature_shape)
        if len(shape) not in (1, 3):
            raise ValueError(f"feature_shape must be (C, H, W) or (D,), got {shape}")
        self.feature_shape = shape
        ch = config.channels
        cmap = config.cmap_dim or ch
        self.mbstd = _MinibatchStd(config.mbstd_group)
        self.reference = config.family == "reference" and len(shape) == 3
        if self.reference:
            # per 2x level: two 3x3 convs (channels doubled up to `channels`, the last level ends
            # at `channels`), then a 2x average pool, down to 2x2
            c, h, w = shape
            blocks: list[nn.Module] = []
            n_levels = 0
            hh, ww = h, w
            while max(hh, ww) > 2:
                hh, ww = (hh + 1) // 2, (ww + 1) // 2
                n_levels += 1
            prev = c
            for level in range(n_levels):
                out = ch if level == n_levels - 1 else min(c * 2**level, ch)
                blocks.append(
                    nn.Sequential(
                        ReferenceConv2d(prev, out), _LReLU(), ReferenceConv2d(out, out), _LReLU()
                    )
                )
                prev = out
            if n_levels == 0:
                blocks.append(nn.Sequential(ReferenceConv2d(prev, ch), _LReLU()))
            self.blocks = nn.ModuleList(blocks)
            self.pool_after = [True] * n_levels + ([False] if n_levels == 0 else [])
            self.final_conv = ReferenceConv2d(ch + 1, ch)
            self.fc = EqualLinear(ch * hh * ww, ch)
            self.out = EqualLinear(ch, cmap)
            self.label_embed = EqualLinear(config.num_classes, cmap, bias=False)
            self.cmap_dim = cmap
            return
        if len(shape) == 3:
            c, h, w = shape
            self.from_features = EqualConv2d(c, ch, 1)
            blocks = []
            while max(h, w) > 2:  # conv + 2x average pool until the map is (at most) 2x2
                blocks.append(EqualConv2d(ch, ch, 3))
                h, w = (h + 1) // 2, (w + 1) // 2
            self.blocks = nn.ModuleList(blocks)
            self.final_conv = EqualConv2d(ch + 1, ch, 3)
            self.fc = EqualLinear(ch * h * w, ch)
        else:
            self.from_features = EqualLinear(shape[0], ch)
            self.blocks = nn.ModuleList()
            self.final_conv = EqualLinear(ch + 1, ch)
            self.fc = EqualLinear(ch, ch)
        self.out = EqualLinear(ch, cmap)
        self.label_embed = EqualLinear(config.num_classes, cmap)
        self.cmap_dim = cmap

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if tuple(features.shape[1:]) != self.feature_shape:
            raise ValueError(
                f"FeatureDiscriminator expects classifier features of shape (N, "
                f"{', '.join(map(str, self.feature_shape))}) and never reads pixels; got "
                f"{tuple(features.shape)}. Pass the output of the hooked feature layer."
            )
        if self.reference:
            x = features
            for block, pool in zip(self.blocks, self.pool_after):
                x = block(x)
                if pool:
                    x = F.avg_pool2d(x, 2, ceil_mode=True)
            x = self.mbstd(x)
            x = F.leaky_relu(self.final_conv(x), 0.2)
            x = F.leaky_relu(self.fc(x.flatten(1)), 0.2)
            h = self.out(x)
            emb = self.label_embed(F.one_hot(labels.long(), self.config.num_classes).to(h.dtype))
            return (h * emb).sum(dim=1) / math.sqrt(self.cmap_dim)
        x = _lrelu(self.from_features(features))
        for conv in self.blocks:
            x = F.avg_pool2d(_lrelu(conv(x)), 2, ceil_mode=True)
        x = self.mbstd(x)
        x = _lrelu(self.final_conv(x))
        x = _lrelu(self.fc(x.flatten(1)))
        h = self.out(x)
        # Projection conditioning: <h, embed(label)> / sqrt(dim).
        emb = _normalize_2nd_moment(
            self.label_embed(F.one_hot(labels.long(), self.config.num_classes).to(h.dtype))
        )
        return (h * emb).sum(dim=1) / math.sqrt(self.cmap_dim)
