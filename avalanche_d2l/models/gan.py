"""Genifer's GAN: a class-conditional style-based generator and a discriminator on features.

* :class:`StyleGenerator` -- StyleGAN2-like, class-conditional: a mapping network turns
  ``z`` + a label embedding into a style ``w``; synthesis starts from a learned 4x4 constant and
  applies style-modulated 3x3 convolutions with weight demodulation, per-layer noise and 2x
  upsamplings up to ``resolution``. Every layer uses the equalised learning rate (weights stored
  at unit variance, scaled by ``1/sqrt(fan_in)`` at run time).
* :class:`FeatureDiscriminator` -- never sees pixels: it reads the classifier's hidden feature map
  (or feature vector), reduces it with convolutions and average pools to 2x2, appends the
  minibatch standard deviation and conditions on the label by projection.

Each comes in two families (``family`` in its config):

* ``"stylegan2"`` / ``"compact"`` (CPU default): demodulated convolutions, 1x1 output layer,
  normalised ``z`` and label embedding, gain-corrected leaky ReLU; a narrow discriminator with a
  1x1 input layer and a normalised label projection.
* ``"reference"``: the layer family of the authors' CIFAR-100 code. Generator: style
  modulation as ``x * scale(w) + shift(w)`` without demodulation, per-channel noise strengths, a
  constant of ones, two convolutions per resolution with the bilinear 2x upsampling (corners
  aligned) after each pair, one at the final size, a 3x3 output convolution; equalised
  convolution weights scaled by ``sqrt(2 / fan_in)``, plain leaky ReLU (0.2), ``z`` and label
  embedding used as they are. Discriminator: per 2x level two 3x3 convolutions (channels doubled
  up to ``channels``) and an average pool down to 2x2, minibatch stddev (group 32), a 3x3
  convolution, a dense layer, a 128-d output and an unnormalised, bias-free label projection.

A generator whose data size is not a power of two synthesises at the next power of two and is
resized (bilinear, antialiased) to ``output_size``. Its outputs are mapped to ``output_range``,
one ``(low, high)`` pair for all channels or per-channel lists.

Both are configured by typed dataclasses (:class:`GeneratorConfig`, :class:`DiscriminatorConfig`)
kept on the module as ``.config`` so that they can be rebuilt from a checkpoint. The generator is
here; its layers are in :mod:`.gan_layers`, the discriminator in :mod:`.gan_discriminator` (both
re-exported).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .gan_discriminator import DiscriminatorConfig, FeatureDiscriminator
from .gan_layers import (
    EqualConv2d,
    EqualLinear,
    ModulatedConv2d,
    ReferenceStyleConv2d,
    _lrelu,
    _normalize_2nd_moment,
)

__all__ = [
    "DiscriminatorConfig",
    "EqualConv2d",
    "EqualLinear",
    "FeatureDiscriminator",
    "GeneratorConfig",
    "ModulatedConv2d",
    "ReferenceStyleConv2d",
    "StyleGenerator",
    "next_power_of_two",
    "range_tensors",
]

_FAMILIES_G = ("stylegan2", "reference")


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= ``max(n, 4)``."""
    return max(4, 1 << (int(n) - 1).bit_length())


def range_tensors(output_range, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)`` as (C,) tensors from ``(lo, hi)`` floats or per-channel sequences."""
    lo, hi = output_range
    lo_t = torch.as_tensor(lo, dtype=torch.float32).flatten()
    hi_t = torch.as_tensor(hi, dtype=torch.float32).flatten()
    if lo_t.numel() == 1:
        lo_t = lo_t.expand(channels)
    if hi_t.numel() == 1:
        hi_t = hi_t.expand(channels)
    if lo_t.numel() != channels or hi_t.numel() != channels:
        raise ValueError(
            f"output_range {output_range!r} does not fit {channels} channels: give "
            "two floats or two lists of one value per channel"
        )
    if bool((hi_t <= lo_t).any()):
        raise ValueError(f"output_range {output_range!r}: every high must exceed its low")
    return lo_t.clone(), hi_t.clone()


@dataclass
class GeneratorConfig:
    """Architecture of :class:`StyleGenerator`.

    Attributes:
        num_classes: size of the one-hot label (all classes of the benchmark).
        resolution: output side in pixels; a power of two >= 4 (8/16 px CPU, 32 CIFAR, 128 CUB).
        img_channels: output channels (equal to the data's channels).
        z_dim: latent size.
        embed_dim: label-embedding size (concatenated with the normalised ``z``).
        w_dim: style size.
        mapping_layers: depth of the mapping network.
        mapping_lr_mul: learning-rate multiplier of the mapping network (StyleGAN uses 0.01).
        channel_base: channels at resolution ``r`` are ``min(channel_base // r, channel_max)``.
        channel_max: cap on the channels of any layer.
        output_activation: ``"sigmoid"`` or ``"tanh"`` map to ``output_range``; ``"none"`` leaves
            the last layer linear (then ``output_range`` only documents the expected range).
        output_range: value range of the classifier's input images: ``(low, high)`` floats, or
            two lists with one value per channel.
        family: ``"stylegan2"`` or ``"reference"`` (see the module docstring).
        output_size: ``(H, W)`` of the data when it differs from ``resolution`` (the synthesis
            size); the output is resized to it (bilinear, antialiased). ``None``: square at
            ``resolution``.
    """

    num_classes: int = 10
    resolution: int = 16
    img_channels: int = 1
    z_dim: int = 64
    embed_dim: int = 32
    w_dim: int = 64
    mapping_layers: int = 2
    mapping_lr_mul: float = 0.01
    channel_base: int = 512
    channel_max: int = 64
    output_activation: str = "sigmoid"
    output_range: tuple = (0.0, 1.0)
    family: str = "stylegan2"
    output_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.output_range = tuple(  # type: ignore[assignment]
            tuple(v) if isinstance(v, (list, tuple)) else float(v) for v in self.output_range
        )
        if self.output_size is not None:
            self.output_size = (int(self.output_size[0]), int(self.output_size[1]))

    def channels(self, res: int) -> int:
        return max(1, min(self.channel_base // res, self.channel_max))

    def validate(self) -> None:
        r = self.resolution
        if r < 4 or r & (r - 1):
            raise ValueError(
                f"GeneratorConfig.resolution must be a power of two >= 4, got {r}; resize the "
                "benchmark's images (e.g. split_digits(image_size=16)) or set the resolution."
            )
        if self.output_activation not in ("sigmoid", "tanh", "none"):
            raise ValueError(
                f"output_activation must be 'sigmoid', 'tanh' or 'none', got "
                f"{self.output_activation!r}"
            )
        if self.num_classes < 1 or self.img_channels < 1:
            raise ValueError("num_classes and img_channels must be positive")
        if self.family not in _FAMILIES_G:
            raise ValueError(f"generator family must be one of {_FAMILIES_G}, got {self.family!r}")
        range_tensors(self.output_range, self.img_channels)


class StyleGenerator(nn.Module):
    """Class-conditional style-based generator (see module docstring).

    ``generate(n, condition)`` is the contract shared with the other generators of the package:
    it returns ``n`` images in the classifier's input range.
    """

    def __init__(self, *, config: GeneratorConfig):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        ref = c.family == "reference"
        # Mapping network: one-hot label -> embedding; [z, embed] -> MLP -> w.
        self.embed = EqualLinear(c.num_classes, c.embed_dim)
        layers: list[nn.Module] = []
        dim = c.z_dim + c.embed_dim
        for _ in range(c.mapping_layers):
            layers.append(EqualLinear(dim, c.w_dim, lr_mul=c.mapping_lr_mul))
            dim = c.w_dim
        self.mapping = nn.ModuleList(layers)
        ch4 = c.channels(4)
        lo, hi = range_tensors(c.output_range, c.img_channels)
        self.register_buffer("range_low", lo.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("range_high", hi.view(1, -1, 1, 1), persistent=False)
        if ref:
            # learned constant of ones; pairs of convs per resolution, upsampling after each pair,
            # one conv at the final resolution, 3x3 output conv
            self.const = nn.Parameter(torch.ones(ch4, 4, 4))
            convs: list[nn.Module] = []
            self.noise_sizes = []
            self.upsample_after: list[bool] = []
            res = 4
            while True:
                ch = c.channels(res)
                if res == c.resolution:
                    convs.append(ReferenceStyleConv2d(ch, ch, c.w_dim))
                    self.noise_sizes.append(res)
                    self.upsample_after.append(False)
                    break
                convs.append(ReferenceStyleConv2d(ch, ch, c.w_dim))
                convs.append(ReferenceStyleConv2d(ch, c.channels(res * 2), c.w_dim))
                self.noise_sizes += [res, res]
                self.upsample_after += [False, True]
                res *= 2
            self.convs = nn.ModuleList(convs)
            self.to_img = ReferenceStyleConv2d(
                c.channels(c.resolution), c.img_channels, c.w_dim, use_noise=False
            )
            return
        # Synthesis network: learned 4x4 constant, then two convs per 2x upsampling.
        self.const = nn.Parameter(torch.randn(ch4, 4, 4))
        convs = [ModulatedConv2d(ch4, ch4, c.w_dim)]
        self.noise_sizes = [4]
        self.upsample_after = []
        prev, res = ch4, 8
        while res <= c.resolution:
            ch = c.channels(res)
            convs.append(ModulatedConv2d(prev, ch, c.w_dim, upsample=True))
            convs.append(ModulatedConv2d(ch, ch, c.w_dim))
            self.noise_sizes += [res, res]
            prev, res = ch, res * 2
        self.convs = nn.ModuleList(convs)
        self.to_img = ModulatedConv2d(
            prev,
            c.img_channels,
            c.w_dim,
            kernel_size=1,
            demodulate=False,
            use_noise=False,
            activation=False,
        )

    @property
    def device(self) -> torch.device:
        return self.const.device

    def mapping_forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Style ``w`` for latents ``z`` (N, z_dim) and integer ``labels`` (N,)."""
        if z.shape[-1] != self.config.z_dim:
            raise ValueError(
                f"z must have {self.config.z_dim} features, got shape {tuple(z.shape)}"
            )
        onehot = F.one_hot(labels.long(), self.config.num_classes).to(z.dtype)
        if self.config.family == "reference":  # z and the embedding used as they are
            h = torch.cat([z, self.embed(onehot)], 1)
            for layer in self.mapping:
                h = F.leaky_relu(layer(h), 0.2)
            return h
        h = torch.cat([_normalize_2nd_moment(z), _normalize_2nd_moment(self.embed(onehot))], 1)
        for layer in self.mapping:
            h = _lrelu(layer(h))
        return h

    def make_noise(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> list[torch.Tensor]:
        """Per-layer noise inputs; pass the same list to two generators to compare them."""
        gen_device = generator.device if generator is not None else None
        noise = [
            torch.randn(n, 1, s, s, generator=generator, device=gen_device)
            for s in self.noise_sizes
        ]
        return [t.to(device or self.device) for t in noise]

    def forward(
        self, z: torch.Tensor, labels: torch.Tensor, noise: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Images for latents ``z`` and ``labels``; ``noise`` from :meth:`make_noise`."""
        if noise is not None and len(noise) != len(self.convs):
            raise ValueError(f"expected {len(self.convs)} noise tensors, got {len(noise)}")
        w = self.mapping_forward(z, labels)
        x = self.const[None].expand(z.shape[0], -1, -1, -1)
        if self.config.family == "reference":
            for i, conv in enumerate(self.convs):
                x = F.leaky_relu(conv(x, w, None if noise is None else noise[i]), 0.2)
                if self.upsample_after[i]:
                    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            for i, conv in enumerate(self.convs):
                x = conv(x, w, None if noise is None else noise[i])
        x = self.to_img(x, w)
        lo, hi = self.range_low.to(x.dtype), self.range_high.to(x.dtype)
        if self.config.output_activation == "sigmoid":
            x = lo + (hi - lo) * torch.sigmoid(x)
        elif self.config.output_activation == "tanh":
            x = lo + (hi - lo) * (torch.tanh(x) + 1) / 2
        size = self.config.output_size
        if size is not None and tuple(x.shape[-2:]) != size:
            # synthesised at the next power of two, resized to the data's size
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        # in the default layout whatever the generator's own (channels-last on CPU): the images
        # go to the user's classifier, which may not take a channels-last input
        return x.contiguous()

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` clamped to ``output_range`` (per channel)."""
        return torch.maximum(torch.minimum(x, self.range_high.to(x)), self.range_low.to(x))

    @torch.no_grad()
    def generate(
        self,
        n: int,
        condition: torch.Tensor | Sequence[int] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``n`` images (no grad) in the classifier's input range.

        Args:
            n: number of images.
            condition: ``n`` labels (tensor), or a list of classes to draw labels from uniformly,
                or ``None`` for all classes.
            generator: torch RNG for ``z``, labels and noise (CPU generator recommended).
        """
        labels = self.sample_labels(n, condition, generator=generator)
        z = torch.randn(
            n,
            self.config.z_dim,
            generator=generator,
            device=generator.device if generator is not None else None,
        )
        noise = self.make_noise(n, generator=generator)
        return self(z.to(self.device), labels.to(self.device), noise)

    def sample_labels(
        self,
        n: int,
        condition: torch.Tensor | Sequence[int] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Labels for :meth:`generate`: ``condition`` as given, or drawn uniformly from it."""
        if isinstance(condition, torch.Tensor) and condition.dim() == 1 and len(condition) == n:
            return condition.long()
        classes = (
            torch.arange(self.config.num_classes)
            if condition is None
            else torch.as_tensor(list(condition), dtype=torch.long)
        )
        if classes.numel() == 0:
            raise ValueError("condition lists no class to generate")
        gen_device = generator.device if generator is not None else None
        idx = torch.randint(len(classes), (n,), generator=generator, device=gen_device)
        return classes[idx.cpu()]

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())
