"""The layers of Genifer's GAN (:mod:`avalanche_d2l.models.gan`): equalised-learning-rate linear
and convolution layers, the style-modulated convolution with weight demodulation, and the
reference family's modulation without demodulation."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "EqualConv2d",
    "EqualLinear",
    "ModulatedConv2d",
    "ReferenceConv2d",
    "ReferenceStyleConv2d",
]

_LRELU_GAIN = math.sqrt(2.0)


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    # Leaky ReLU rescaled so that unit-variance inputs keep unit variance (StyleGAN convention).
    return F.leaky_relu(x, 0.2) * _LRELU_GAIN


def _normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate.

    The stored weight has unit variance (divided by ``lr_mul``); the forward pass multiplies it by
    ``lr_mul / sqrt(in_features)`` so that every layer learns at the same speed under Adam.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init))) if bias else None
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias * self.lr_mul if self.bias is not None else None
        return F.linear(x, self.weight * self.weight_gain, b)


class EqualConv2d(nn.Module):
    """2-D convolution with equalised learning rate (runtime weight scale ``1/sqrt(fan_in)``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        bias: bool = True,
        padding: int | None = None,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = kernel_size // 2 if padding is None else padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.padding)


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution (StyleGAN2) with optional demodulation, upsampling, noise.

    The modulation is applied to the activations rather than to a per-sample weight copy
    (mathematically identical, and much cheaper on CPU than a grouped convolution).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        *,
        kernel_size: int = 3,
        demodulate: bool = True,
        upsample: bool = False,
        use_noise: bool = True,
        activation: bool = True,
    ):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = nn.Parameter(torch.zeros(())) if use_noise else None
        self.demodulate = demodulate
        self.upsample = upsample
        self.activation = activation
        self.padding = kernel_size // 2

    def forward(
        self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        styles = self.affine(w)  # (N, Cin)
        weight = self.weight * self.weight_gain
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        # 1. modulate the input channels by the style
        x = x * styles[:, :, None, None].to(x.dtype)
        x = F.conv2d(x, weight.to(x.dtype), padding=self.padding)
        # 2. demodulate: rescale every output channel back to unit expected variance
        if self.demodulate:
            # sum_{i,k} (w[o,i,k] s[i])^2 = sum_i s[i]^2 sum_k w[o,i,k]^2: one small matmul, not
            # an (N, Cout, Cin, k, k) per-sample weight (most of a CPU GAN step's time)
            dcoefs = (styles.square() @ weight.square().sum(dim=[2, 3]).t() + 1e-8).rsqrt()
            x = x * dcoefs[:, :, None, None].to(x.dtype)
        # 3. per-pixel noise, scaled by a learned strength (starts at zero)
        if self.noise_strength is not None:
            if noise is None:
                noise = torch.randn(
                    x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype
                )
            x = x + noise.to(x.dtype) * self.noise_strength
        x = x + self.bias[None, :, None, None].to(x.dtype)
        return _lrelu(x) if self.activation else x


class ReferenceConv2d(nn.Module):
    """Equalised 3x3 convolution of the reference family: weight ``N(0, 1)`` scaled at run time by
    ``sqrt(2 / fan_in)``, bias unscaled (starts at zero)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = math.sqrt(2.0) / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            x,
            (self.weight * self.weight_gain).to(x.dtype),
            self.bias.to(x.dtype),
            padding=self.padding,
        )


class ReferenceStyleConv2d(ReferenceConv2d):
    """Reference-family style convolution: ``conv(x * scale(w) + shift(w)) + strength * noise``.

    No demodulation; ``scale`` starts at 1 and ``shift`` at 0; one learned noise strength per
    output channel (starts at zero). No activation (the generator applies it).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        *,
        kernel_size: int = 3,
        use_noise: bool = True,
    ):
        super().__init__(in_channels, out_channels, kernel_size)
        self.scale = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.shift = EqualLinear(w_dim, in_channels, bias_init=0.0)
        self.noise_strength = (
            nn.Parameter(torch.zeros(1, out_channels, 1, 1)) if use_noise else None
        )

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,  # type: ignore[override]
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x * self.scale(w)[:, :, None, None].to(x.dtype) + self.shift(w)[:, :, None, None].to(
            x.dtype
        )
        x = super().forward(x)
        if self.noise_strength is not None:
            if noise is None:
                noise = torch.randn(
                    x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype
                )
            x = x + noise.to(x.dtype) * self.noise_strength.to(x.dtype)
        return x
