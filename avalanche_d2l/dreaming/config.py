"""Settings of a :class:`~avalanche_d2l.dreaming.dreamer.Dreamer` and the image-space maps
between a dreamer's native images and a classifier's inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from torch.nn import functional as F

from ..core.config import ConfigBase
from .accel import PRECISIONS

__all__ = [
    "DEFAULT_SD_CAPTIONS",
    "DreamerConfig",
    "from_classifier_space",
    "latent_size_for",
    "to_classifier_space",
]

CONFIG_NAME = "dreamer_config.json"
CONCEPTS_NAME = "concepts.pt"
REFERENCE_DIR = "reference"
TRAINING_INFO_NAME = "training_info.json"

#: Captions whose CLIP embeddings span the prompt space for a Stable-Diffusion dreamer when the
#: user gives none (used by :meth:`Dreamer.concept_embeddings` / :meth:`Dreamer.random_prompt`).
DEFAULT_SD_CAPTIONS: tuple[str, ...] = (
    "a photo of a dog",
    "a photo of a cat",
    "a photo of a bird",
    "a photo of a fish",
    "a photo of a flower",
    "a photo of a tree",
    "a photo of a car",
    "a photo of a boat",
    "a photo of an airplane",
    "a photo of a house",
    "a photo of a chair",
    "a photo of a cup",
    "a photo of a fruit",
    "a photo of a mushroom",
    "a photo of an insect",
    "a photo of a snake",
    "a photo of a shoe",
    "a photo of a clock",
    "a photo of a musical instrument",
    "a photo of a tool",
    "a photo of a mountain",
    "a photo of food",
    "a photo of a toy",
    "a photo of a building",
)


@dataclass
class DreamerConfig(ConfigBase):
    """Settings of a :class:`Dreamer`; saved as ``dreamer_config.json`` next to the weights.

    Attributes:
        kind: ``"pixel"`` (denoiser works on images) or ``"latent"`` (Stable Diffusion: VAE + UNet).
        image_size: native side of the generated images in pixels (latent kind: after decoding).
        channels: native image channels (1 for the glyph dreamer, 3 for Stable Diffusion).
        prompt_len: ``L``, tokens of a prompt (``encoder_hidden_states.shape[1]``).
        prompt_dim: ``D``, width of a token (the UNet's ``cross_attention_dim``).
        num_inference_steps: DDIM steps of the differentiable loop.
        backprop_steps: only the last ``k`` steps keep a graph; ``None`` keeps all.
        gradient_checkpointing: recompute every UNet block and every VAE decoder block in
            backward (memory for time; diffusers' per-block checkpointing, or the whole UNet call
            for a denoiser without it).
        guidance_scale: classifier-free guidance weight; ``1.0`` disables it (one UNet call/step).
        eta: DDIM noise weight (0 = deterministic DDIM).
        mixed_precision: ``"auto"`` (bf16 on GPU, fp32 on CPU), ``"no"``, ``"fp16"`` or
            ``"bf16"`` autocast around the UNet/VAE calls.
        output_size: side of the classifier's input; ``None`` keeps ``image_size``.
        output_channels: channels of the classifier's input (1 <-> 3 conversion); ``None`` keeps.
        output_mean: per-channel mean of the classifier's normalisation; ``None``: images in [0, 1].
        output_std: per-channel std of the classifier's normalisation (with ``output_mean``).
        latent_channels: channels of the denoised tensor (latent kind: VAE latent channels).
        latent_size: side of the denoised tensor (latent kind: ``image_size / vae_scale``; see
            :func:`latent_size_for` to derive it from the learner's resolution).
        concept_names: names of the concepts of :meth:`Dreamer.concept_embeddings` (glyphs).
        concept_captions: captions encoded as concepts for the latent kind.
        prompt_noise: std of the noise :meth:`Dreamer.random_prompt` adds, relative to the
            per-dimension std of the concept embeddings.
        prompt_mix: :meth:`Dreamer.random_prompt` mixes between 2 and ``prompt_mix`` concepts.
        has_null_prompt: the denoiser was trained with a null prompt (enables CFG).
    """

    kind: str
    image_size: int
    channels: int
    prompt_len: int
    prompt_dim: int
    num_inference_steps: int = 4
    backprop_steps: int | None = None
    gradient_checkpointing: bool = False
    guidance_scale: float = 1.0
    eta: float = 0.0
    mixed_precision: str = "auto"
    output_size: int | None = None
    output_channels: int | None = None
    output_mean: tuple[float, ...] | None = None
    output_std: tuple[float, ...] | None = None
    latent_channels: int | None = None
    latent_size: int | None = None
    concept_names: list[str] | None = None
    concept_captions: list[str] | None = None
    prompt_noise: float = 0.1
    prompt_mix: int = 3
    has_null_prompt: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    # from_dict keeps values as given, as saved dreamers' ``dreamer_config.json`` hold them
    checks_types = False

    def __post_init__(self) -> None:
        if self.kind not in ("pixel", "latent"):
            raise ValueError(f"DreamerConfig.kind must be 'pixel' or 'latent', got {self.kind!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(
                f"mixed_precision must be one of {list(PRECISIONS)}, got {self.mixed_precision!r}"
            )
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.backprop_steps is not None and self.backprop_steps < 1:
            raise ValueError(
                f"backprop_steps must be None (all steps) or >= 1, got {self.backprop_steps}"
            )
        if (self.output_mean is None) != (self.output_std is None):
            raise ValueError("pass both output_mean and output_std, or neither")
        if self.output_mean is not None:
            self.output_mean = tuple(float(v) for v in self.output_mean)
            self.output_std = tuple(float(v) for v in self.output_std)
            if (
                len(self.output_mean) != self.out_channels
                or len(self.output_std) != self.out_channels
            ):
                raise ValueError(
                    f"output_mean/output_std need {self.out_channels} values (one per output "
                    f"channel), got {len(self.output_mean)}/{len(self.output_std)}"
                )
        if self.latent_channels is None:
            self.latent_channels = self.channels
        if self.latent_size is None:
            self.latent_size = self.image_size

    @property
    def out_size(self) -> int:
        """Side of the images :meth:`Dreamer.sample` returns."""
        return self.output_size or self.image_size

    @property
    def out_channels(self) -> int:
        """Channels of the images :meth:`Dreamer.sample` returns."""
        return self.output_channels or self.channels


def latent_size_for(
    resolution: int, vae_scale_factor: int = 8, *, min_latent: int = 32, multiple: int = 8
) -> int:
    """Side of the latents for a learner of side ``resolution`` pixels.

    The smallest multiple of ``multiple`` (the UNet halves the latents three times for SD-1.x)
    whose decoded side ``latent * vae_scale_factor`` covers ``resolution``, and at least
    ``min_latent`` (below 32x32 latents, 256 px, Stable Diffusion's images fall apart). So 84-256 px
    learners dream at 32x32 latents (256 px decoded, then resized), 512 px learners at 64x64.
    """
    if resolution < 1 or vae_scale_factor < 1 or multiple < 1:
        raise ValueError(
            f"resolution, vae_scale_factor and multiple must be >= 1, got {resolution}, "
            f"{vae_scale_factor}, {multiple}"
        )
    need = -(-int(resolution) // int(vae_scale_factor))  # ceil
    need = -(-need // int(multiple)) * int(multiple)
    return max(int(min_latent), need)


# ------------------------------------------------------------------------------------------------
# image-space conversions


def _convert_channels(x: Tensor, channels: int) -> Tensor:
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1:
        return x.expand(-1, channels, -1, -1).contiguous()
    if channels == 1 and c == 3:
        w = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels (only 1 <-> 3)")


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    down = size < x.shape[-1]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=down)


def to_classifier_space(
    x01: Tensor,
    *,
    size: int,
    channels: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Tensor:
    """Map images in [0, 1] to a classifier's input space (differentiable).

    Resize (bilinear, antialiased when shrinking), convert channels (grey repeated to RGB, RGB to
    luminance), then ``(x - mean) / std`` when given.
    """
    x = _convert_channels(_resize(x01, size), channels)
    if mean is not None:
        m = x.new_tensor(mean).view(1, -1, 1, 1)
        s = x.new_tensor(std).view(1, -1, 1, 1)
        x = (x - m) / s
    return x


def from_classifier_space(
    x: Tensor, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Tensor:
    """Undo the normalisation of :func:`to_classifier_space`: back to [0, 1] values."""
    if mean is None:
        return x
    m = x.new_tensor(mean).view(1, -1, 1, 1)
    s = x.new_tensor(std).view(1, -1, 1, 1)
    return x * s + m
