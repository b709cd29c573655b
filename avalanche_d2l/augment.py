"""Differentiable image-space augmentation with an adaptive probability (ADA-style).

Genifer augments real *and* generated images before they enter the classifier whose features the
discriminator reads. Every operation is differentiable with respect to the images, so the
generator is trained through it. Each operation is applied to each image independently with
probability ``p``; :class:`AdaptiveAugment` adapts ``p`` so that the discriminator's sign on real
features, ``E[sign(D(real))]``, stays near a target (0.5), capped at ``p_max``.

Geometric operations (x-flip, 90-degree rotation, integer translation, isotropic scaling,
rotation, anisotropic scaling, fractional translation) are composed into one affine matrix per
image and applied with a single ``grid_sample``; colour operations (brightness, contrast, luma
flip, hue rotation, saturation) are arithmetic. The StyleGAN2-ADA pipeline the authors' Genifer
code uses has all twelve, each at strength 1 (its defaults: translation 0.125, scale and
anisotropy std 0.2, rotation +-180 degrees, fractional translation std 0.125, brightness std 0.2,
contrast std 0.5, hue +-180 degrees, saturation std 1); :meth:`AugmentConfig.reference` is that
setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["AdaptiveAugment", "AugmentConfig", "augment"]


@dataclass
class AugmentConfig:
    """Which augmentations to use and how strong they are (images in [0, 1]).

    Attributes:
        xflip: horizontal flip.
        rotate90: rotation by a multiple of 90 degrees (square images only).
        translate: integer translation up to this fraction of the side.
        scale_std: std of ``log2`` of the isotropic scale.
        rotate_max_deg: arbitrary rotation drawn uniformly in +-this many degrees.
        brightness_std: std of the additive brightness shift.
        contrast_std: std of ``log2`` of the contrast factor.
        saturation_std: std of ``log2`` of the saturation factor (RGB only).
        padding_mode: ``grid_sample`` padding for the geometric operations.
        aniso_std: std of ``log2`` of an anisotropic scale (x by ``s``, y by ``1/s``); 0 = off.
        xfrac_std: std of a fractional translation, as a fraction of the side; 0 = off.
        lumaflip: invert the luminance around ``color_center`` (RGB: along the grey axis).
        hue_max: rotation of the hue around the grey axis, up to this fraction of 180 degrees
            (RGB only); 0 = off.
        color_center: value the contrast of the luma flip and the hue rotation pivot around
            (0.5 for images in [0, 1]; 0 for mean/std-normalised images). Contrast scales around
            each image's mean.
    """

    xflip: bool = True
    rotate90: bool = True
    translate: float = 0.125
    scale_std: float = 0.2
    rotate_max_deg: float = 180.0
    brightness_std: float = 0.1
    contrast_std: float = 0.5
    saturation_std: float = 1.0
    padding_mode: str = "reflection"
    aniso_std: float = 0.0
    xfrac_std: float = 0.0
    lumaflip: bool = False
    hue_max: float = 0.0
    color_center: float = 0.5

    @classmethod
    def reference(cls, *, color_center: float = 0.0) -> AugmentConfig:
        """All twelve operations of the authors' pipeline at its default strengths."""
        return cls(
            xflip=True,
            rotate90=True,
            translate=0.125,
            scale_std=0.2,
            rotate_max_deg=180.0,
            brightness_std=0.2,
            contrast_std=0.5,
            saturation_std=1.0,
            padding_mode="reflection",
            aniso_std=0.2,
            xfrac_std=0.125,
            lumaflip=True,
            hue_max=1.0,
            color_center=color_center,
        )


def _rand(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator)


def _randn(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(n, generator=generator)


def augment(
    x: torch.Tensor,
    p: float,
    config: AugmentConfig | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Augment a batch ``x`` (N, C, H, W); each operation hits each image with probability ``p``.

    Random draws come from ``generator`` (a CPU generator) so runs are reproducible on any device.
    Returns ``x`` itself when ``p == 0``.
    """
    if p <= 0:
        return x
    cfg = config or AugmentConfig()
    n, c, h, w = x.shape

    def hit() -> torch.Tensor:
        return (_rand(n, generator) < p).float()

    # 1. geometric: compose one 2x3 matrix per image (output coords -> input coords)
    mat = torch.eye(3).repeat(n, 1, 1)

    def compose(m: torch.Tensor) -> None:
        nonlocal mat
        mat = mat @ m

    geometric = False
    if cfg.xflip:
        flip = hit() * (_rand(n, generator) < 0.5).float()
        m = torch.eye(3).repeat(n, 1, 1)
        m[:, 0, 0] = 1 - 2 * flip
        compose(m)
        geometric = True
    if cfg.rotate90 and h == w:
        k = hit() * torch.floor(_rand(n, generator) * 4)
        ang = k * (math.pi / 2)
        compose(_rotation(ang))
        geometric = True
    if cfg.translate > 0:
        # integer pixel shifts: a shift of s pixels is 2*s/size in normalised coordinates
        g = hit()
        tx = torch.round((_rand(n, generator) * 2 - 1) * cfg.translate * w) * g
        ty = torch.round((_rand(n, generator) * 2 - 1) * cfg.translate * h) * g
        m = torch.eye(3).repeat(n, 1, 1)
        m[:, 0, 2] = 2 * tx / w
        m[:, 1, 2] = 2 * ty / h
        compose(m)
        geometric = True
    if cfg.scale_std > 0:
        s = torch.exp2(_randn(n, generator) * cfg.scale_std * hit())
        m = torch.eye(3).repeat(n, 1, 1)
        m[:, 0, 0] = 1 / s
        m[:, 1, 1] = 1 / s
        compose(m)
        geometric = True
    if cfg.rotate_max_deg > 0:
        ang = (_rand(n, generator) * 2 - 1) * math.radians(cfg.rotate_max_deg) * hit()
        compose(_rotation(ang))
        geometric = True
    if cfg.aniso_std > 0:
        s = torch.exp2(_randn(n, generator) * cfg.aniso_std * hit())
        m = torch.eye(3).repeat(n, 1, 1)
        m[:, 0, 0] = 1 / s
        m[:, 1, 1] = s
        compose(m)
        geometric = True
    if cfg.xfrac_std > 0:
        g = hit()
        tx = _randn(n, generator) * cfg.xfrac_std * g
        ty = _randn(n, generator) * cfg.xfrac_std * g
        m = torch.eye(3).repeat(n, 1, 1)
        m[:, 0, 2] = 2 * tx
        m[:, 1, 2] = 2 * ty
        compose(m)
        geometric = True
    if geometric and not torch.equal(mat, torch.eye(3).expand(n, 3, 3)):
        theta = mat[:, :2, :].to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(
            x, grid, mode="bilinear", padding_mode=cfg.padding_mode, align_corners=False
        )

    # 2. colour
    def col(v: torch.Tensor) -> torch.Tensor:
        return v.to(device=x.device, dtype=x.dtype).view(n, 1, 1, 1)

    if cfg.brightness_std > 0:
        x = x + col(_randn(n, generator) * cfg.brightness_std * hit())
    if cfg.contrast_std > 0:
        factor = col(torch.exp2(_randn(n, generator) * cfg.contrast_std * hit()))
        mean = x.mean(dim=[1, 2, 3], keepdim=True)
        x = (x - mean) * factor + mean
    center = float(cfg.color_center)
    if cfg.lumaflip:
        flip = col(hit() * torch.floor(_rand(n, generator) * 2))  # 0 or 1
        if c == 3:  # reflect the component along the grey axis
            grey = (x - center).mean(dim=1, keepdim=True)
            x = x - 2 * flip * grey
        else:
            x = x + flip * (2 * center - 2 * x)
    if cfg.hue_max > 0 and c == 3:
        theta = (_rand(n, generator) * 2 - 1) * math.pi * cfg.hue_max * hit()
        rot = _hue_rotation(theta).to(device=x.device, dtype=x.dtype)  # (n, 3, 3)
        x = torch.einsum("nij,njhw->nihw", rot, x - center) + center
    if cfg.saturation_std > 0 and c == 3:
        factor = col(torch.exp2(_randn(n, generator) * cfg.saturation_std * hit()))
        luma = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = luma + (x - luma) * factor
    return x


def _hue_rotation(theta: torch.Tensor) -> torch.Tensor:
    """Rotation matrices by ``theta`` around the grey axis (1, 1, 1) / sqrt(3) (Rodrigues)."""
    v = torch.full((3,), 1 / math.sqrt(3))
    vv = torch.outer(v, v)
    k = torch.tensor([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    return cos * torch.eye(3) + sin * k + (1 - cos) * vv


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(angle), torch.sin(angle)
    m = torch.eye(3).repeat(len(angle), 1, 1)
    m[:, 0, 0], m[:, 0, 1] = cos, -sin
    m[:, 1, 0], m[:, 1, 1] = sin, cos
    return m


class AdaptiveAugment(nn.Module):
    """:func:`augment` with a probability ``p`` adapted from the discriminator's outputs.

    Call :meth:`accumulate` with ``D(real)`` every step and :meth:`adjust` every
    ``interval`` steps. ``p`` moves by ``sign(E[sign(D(real))] - target) * n_images / (kimg*1000)``
    (so it can go from 0 to 1 in ``kimg`` thousand images) and stays in ``[0, p_max]``.

    Args:
        config: the operations.
        target: target of ``E[sign(D(real))]`` (0.5 in the paper).
        p_max: cap on ``p`` (0.5 in the paper).
        kimg: speed of the adaptation, thousands of images for a full 0 -> 1 swing.
    """

    def __init__(
        self,
        *,
        config: AugmentConfig | None = None,
        target: float = 0.5,
        p_max: float = 0.5,
        kimg: float = 20.0,
    ):
        super().__init__()
        self.config = config or AugmentConfig()
        self.target = target
        self.p_max = p_max
        self.kimg = kimg
        self.register_buffer("p", torch.zeros(()))
        self.register_buffer("_sign_sum", torch.zeros(()))
        self.register_buffer("_count", torch.zeros(()))

    def forward(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return augment(x, float(self.p), self.config, generator=generator)

    @torch.no_grad()
    def accumulate(self, d_real: torch.Tensor) -> None:
        """Record the discriminator's logits on (augmented) real inputs."""
        self._sign_sum += torch.sign(d_real.detach().float()).sum().cpu()
        self._count += d_real.numel()

    @torch.no_grad()
    def adjust(self) -> float | None:
        """Move ``p`` toward the target overfitting level; returns the measured ``r_t``."""
        if self._count == 0:
            return None
        rt = float(self._sign_sum / self._count)
        step = float(self._count) / (self.kimg * 1000)
        new_p = float(self.p) + (step if rt > self.target else -step)
        self.p.fill_(min(max(new_p, 0.0), self.p_max))
        self._sign_sum.zero_()
        self._count.zero_()
        return rt

    @torch.no_grad()
    def reset(self) -> None:
        """``p = 0`` and clear the statistics (done at the start of every experience)."""
        self.p.zero_()
        self._sign_sum.zero_()
        self._count.zero_()

    def extra_repr(self) -> str:
        return f"p={float(self.p):.3f}, target={self.target}, p_max={self.p_max}, kimg={self.kimg}"
