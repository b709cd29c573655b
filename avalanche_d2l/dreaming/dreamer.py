"""The frozen diffusion *dreamer*: a diffusers denoiser plus our own short, differentiable sampler.

D2L optimises a soft prompt (a tensor in the denoiser's text-embedding space, shape ``(L, D)``)
through a loss that the continual learner computes on the generated images. Diffusers pipelines run
their ``__call__`` under ``torch.no_grad()``, so :meth:`Dreamer.sample` writes the DDIM loop out
step by step: noise -> ``num_inference_steps`` DDIM steps with a diffusers ``DDIMScheduler`` ->
(VAE decode for latent models) -> the classifier's input space. Only the last ``backprop_steps``
steps keep a graph (truncated backprop); the weights stay frozen.

Two kinds share one class:

* ``"pixel"``: the offline default, a small ``UNet2DConditionModel`` trained on font glyphs in pixel
  space (see :mod:`avalanche_d2l.dreaming.pretrain`); its "text-embedding space" is a learned
  concept table ``(K, L, D)`` saved with it.
* ``"latent"``: any Stable-Diffusion-family checkpoint (hub id or local diffusers directory): UNet +
  ``AutoencoderKL`` + CLIP text encoder/tokenizer, with the scheduler config turned into DDIM.

Precision: ``DreamerConfig.mixed_precision`` (``"auto"``: bf16 on a GPU, fp16 on a GPU without
bf16, fp32 on CPU; see :func:`avalanche_d2l.dreaming.accel.resolve_precision`) is a
``torch.autocast`` region around the UNet/VAE calls; :meth:`Dreamer.from_pretrained` also loads the
weights in that dtype on a GPU. The DDIM update itself runs in float32. Memory: with
``gradient_checkpointing`` every UNet block and every VAE decoder block is recomputed in backward
(diffusers' per-block checkpointing), so what a graph keeps per image is the inputs of the blocks.
Processes, seeds and the sharding of a dreaming phase live in :mod:`.accel` and
:func:`~avalanche_d2l.dreaming.prompts.dream_classes`; the dreamer itself is one frozen module on
one device (``Dreamer.from_pretrained(..., device=...)`` may put it on another device than the
learner).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ..utils import resolve_device
from .accel import PRECISIONS, autocast, precision_dtype, resolve_precision

__all__ = [
    "DEFAULT_SD_CAPTIONS",
    "Dreamer",
    "DreamerConfig",
    "ReferenceNetwork",
    "from_classifier_space",
    "latent_size_for",
    "load_reference_network",
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
class DreamerConfig:
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

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("output_mean", "output_std"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DreamerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown DreamerConfig fields {unknown}; valid fields: {sorted(names)}"
            )
        return cls(**d)


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


def _ddim_for(scheduler: Any, kind: str):
    """The scheduler as DDIM with the same betas; for latent models with ``clip_sample=False``
    and ``steps_offset=1``, the two fixes the diffusers Stable Diffusion pipeline applies to old
    scheduler configs (a config without ``clip_sample`` would otherwise clip latents each step)."""
    from diffusers import DDIMScheduler

    if not isinstance(scheduler, DDIMScheduler):
        scheduler = DDIMScheduler.from_config(scheduler.config)
    if kind == "latent":
        fix = {}
        if scheduler.config.get("clip_sample", True):
            fix["clip_sample"] = False
        if scheduler.config.get("steps_offset", 0) != 1:
            fix["steps_offset"] = 1
        if fix:
            # drop diffusers' bookkeeping keys: "_use_default_values" would re-apply the defaults
            cfg = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
            scheduler = DDIMScheduler.from_config({**cfg, **fix})
    return scheduler


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


class ReferenceNetwork(nn.Module):
    """A frozen classifier fed with images in the dreamer's output space (what ``sample`` returns).

    It undoes the dreamer's output normalisation, converts to the network's own input (size,
    channels, normalisation) and returns the network's logits. Used by D2L's oracle, it is
    independent of the continual learner.

    Args:
        net: the classifier.
        in_size: its input side.
        in_channels: its input channels.
        in_mean: its input normalisation mean (``None``: [0, 1] inputs).
        in_std: its input normalisation std.
        src_mean: the dreamer's output normalisation mean (``None``: [0, 1]).
        src_std: the dreamer's output normalisation std.
        class_names: names of the network's classes.
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        in_size: int,
        in_channels: int,
        in_mean: Sequence[float] | None = None,
        in_std: Sequence[float] | None = None,
        src_mean: Sequence[float] | None = None,
        src_std: Sequence[float] | None = None,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        self.net = net
        self.in_size = int(in_size)
        self.in_channels = int(in_channels)
        self.in_mean = tuple(in_mean) if in_mean is not None else None
        self.in_std = tuple(in_std) if in_std is not None else None
        self.src_mean = tuple(src_mean) if src_mean is not None else None
        self.src_std = tuple(src_std) if src_std is not None else None
        self.class_names = class_names
        self._saveable: dict | None = None  # architecture spec when it can be saved/rebuilt
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ReferenceNetwork:
        # Frozen: always in eval mode (BatchNorm statistics never move).
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        x01 = from_classifier_space(images, mean=self.src_mean, std=self.src_std).clamp(0, 1)
        x = to_classifier_space(
            x01, size=self.in_size, channels=self.in_channels, mean=self.in_mean, std=self.in_std
        )
        p = next(self.net.parameters(), None)
        if p is not None:
            x = x.to(device=p.device, dtype=p.dtype)
        return self.net(x)


# ------------------------------------------------------------------------------------------------
# the dreamer


class Dreamer(nn.Module):
    """Frozen conditional diffusion model with a differentiable few-step DDIM sampler.

    Build it with :meth:`from_pretrained` (our saved directory, a diffusers Stable-Diffusion
    layout or hub id) or :meth:`from_config` (random init, for tests). All parameters have
    ``requires_grad=False`` and the module stays in eval mode; gradients flow only to the prompt
    passed to :meth:`sample`.

    Args:
        config: the :class:`DreamerConfig`.
        unet: a diffusers ``UNet2DConditionModel``.
        scheduler: a diffusers ``DDIMScheduler``.
        vae: ``AutoencoderKL`` (latent kind only).
        text_encoder: CLIP text model (latent kind, optional: concepts and :meth:`encode_text`).
        tokenizer: its tokenizer.
        concept_table: ``(K, L, D)`` concept embeddings (pixel kind).
        null_prompt: ``(L, D)`` unconditional embedding for CFG.
        reference: frozen reference classifier for the oracle, or ``None``.
    """

    def __init__(
        self,
        *,
        config: DreamerConfig,
        unet: nn.Module,
        scheduler: Any,
        vae: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any | None = None,
        concept_table: Tensor | None = None,
        null_prompt: Tensor | None = None,
        reference: ReferenceNetwork | None = None,
    ):
        super().__init__()
        if config.kind == "latent" and vae is None:
            raise ValueError("a 'latent' dreamer needs a VAE (AutoencoderKL); pass vae=...")
        if config.kind == "latent":
            factor = _vae_scale(vae)
            if config.latent_size * factor != config.image_size:
                raise ValueError(
                    f"latent_size={config.latent_size} x VAE scale factor {factor} = "
                    f"{config.latent_size * factor} px, but image_size={config.image_size}; set "
                    f"image_size={config.latent_size * factor} (or latent_size="
                    f"{config.image_size // factor}), e.g. latent_size=latent_size_for(resolution)"
                )
        scheduler = _ddim_for(scheduler, config.kind)
        self.config = config
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        L, D = config.prompt_len, config.prompt_dim
        if concept_table is not None and tuple(concept_table.shape[1:]) != (L, D):
            raise ValueError(
                f"concept_table has shape {tuple(concept_table.shape)}, expected (K, {L}, {D})"
            )
        if null_prompt is not None and tuple(null_prompt.shape) != (L, D):
            raise ValueError(
                f"null_prompt has shape {tuple(null_prompt.shape)}, expected ({L}, {D})"
            )
        self.register_buffer(
            "concept_table",
            concept_table.detach().float().clone() if concept_table is not None else None,
        )
        self.register_buffer(
            "null_prompt", null_prompt.detach().float().clone() if null_prompt is not None else None
        )
        self._reference = reference
        self._reference_source: str | None = "saved with the dreamer" if reference else None
        self._reference_missing: str | None = None  # why the default reference is absent
        self._text_concepts: Tensor | None = None  # cache of encoded captions (latent kind)
        self.requires_grad_(False)
        self.eval()

    # ---- nn.Module behaviour: frozen, eval-only ------------------------------------------------

    def train(self, mode: bool = True) -> Dreamer:
        # The dreamer is never trained here: keep every sub-module in eval mode.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def precision(self) -> str:
        """Resolved mixed precision on the current device: ``"no"``, ``"fp16"`` or ``"bf16"``."""
        return resolve_precision(self.config.mixed_precision, self.device)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent side (8 for Stable Diffusion; 1 for the pixel kind)."""
        return _vae_scale(self.vae) if self.vae is not None else 1

    @property
    def prompt_shape(self) -> tuple[int, int]:
        """``(L, D)``: shape of one prompt."""
        return (self.config.prompt_len, self.config.prompt_dim)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images :meth:`sample` returns."""
        s = self.config.out_size
        return (self.config.out_channels, s, s)

    def to(self, *args, **kwargs) -> Dreamer:
        out = super().to(*args, **kwargs)  # the reference network is a sub-module: moved too
        self._text_concepts = None
        return out

    def _autocast(self):
        return autocast(self.precision, self.device)

    def _per_block_checkpointing(self) -> bool:
        """Switch diffusers' per-block checkpointing of the UNet and the VAE to the config's
        setting; False when the UNet has none (then :meth:`sample` checkpoints the whole call)."""
        on = bool(self.config.gradient_checkpointing)
        per_block = bool(getattr(self.unet, "_supports_gradient_checkpointing", False))
        for m in (self.unet, self.vae):
            if m is None or not getattr(m, "_supports_gradient_checkpointing", False):
                continue
            if m.is_gradient_checkpointing != on:
                if on:
                    m.enable_gradient_checkpointing()
                else:
                    m.disable_gradient_checkpointing()
        return per_block

    # ---- sampling --------------------------------------------------------------------------------

    def _predict_noise(self, x: Tensor, t: Tensor, prompt: Tensor, use_ckpt: bool) -> Tensor:
        """One denoiser evaluation with optional classifier-free guidance."""
        g = self.config.guidance_scale
        cfg = g != 1.0
        if cfg and self.null_prompt is None:
            raise ValueError(
                f"guidance_scale={g} needs a null prompt, but this dreamer has none; "
                "set guidance_scale=1.0"
            )
        if cfg:
            null = self.null_prompt.to(prompt.dtype).expand(x.shape[0], -1, -1)
            x_in, cond = torch.cat([x, x]), torch.cat([null, prompt])
        else:
            x_in, cond = x, prompt

        def unet_call(x_in: Tensor, cond: Tensor) -> Tensor:
            return self.unet(x_in, t, encoder_hidden_states=cond, return_dict=False)[0]

        if use_ckpt:
            out = checkpoint(unet_call, x_in, cond, use_reentrant=False)
        else:
            out = unet_call(x_in, cond)
        if cfg:
            uncond, text = out.chunk(2)
            out = uncond + g * (text - uncond)
        return out

    def _decode(self, z: Tensor) -> Tensor:
        """Latent kind: VAE-decode scaled latents to images in [-1, 1] (differentiable)."""
        scale = getattr(self.vae.config, "scaling_factor", 1.0)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return self.vae.decode(z / scale + shift, return_dict=False)[0]

    def sample(
        self,
        prompt_embeds: Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        variance_noise: Tensor | None = None,
        num_inference_steps: int | None = None,
        backprop_steps: int | None = None,
        grad: bool = True,
        init: Tensor | None = None,
        strength: float = 1.0,
    ) -> Tensor:
        """Generate one image per prompt through the differentiable DDIM loop.

        Args:
            prompt_embeds: ``(B, L, D)`` prompts; may require grad.
            generator: seeds the initial noise (and the DDIM noise when ``eta > 0``).
            noise: explicit initial noise ``(B, latent_channels, latent_size, latent_size)``.
            variance_noise: explicit DDIM noise ``(steps, B, latent_channels, latent_size,
                latent_size)`` for ``eta > 0`` (instead of drawing it from ``generator``), so
                that an image does not depend on the other images of its batch.
            num_inference_steps: overrides ``config.num_inference_steps``.
            backprop_steps: overrides ``config.backprop_steps`` (last ``k`` steps keep a graph).
            grad: ``False`` runs the whole loop without a graph.
            init: image-to-image start ``(B, latent_channels, latent_size, latent_size)`` in the
                denoiser's space (:meth:`encode`); ``None`` starts from pure noise.
            strength: with ``init``: the share of the DDIM steps that run, as the diffusers
                img2img pipeline does: ``init`` is noised to the first of the last
                ``round(steps * strength)`` timesteps with the scheduler's own ``add_noise``
                and denoised from there (at least one step).

        Returns:
            ``(B, C_out, H_out, W_out)`` images in the classifier's input space (float32).
        """
        cfg = self.config
        if prompt_embeds.dim() != 3 or tuple(prompt_embeds.shape[1:]) != self.prompt_shape:
            raise ValueError(
                f"prompt_embeds must have shape (B, {cfg.prompt_len}, {cfg.prompt_dim}), "
                f"got {tuple(prompt_embeds.shape)}"
            )
        steps = int(num_inference_steps or cfg.num_inference_steps)
        k = backprop_steps if backprop_steps is not None else cfg.backprop_steps
        k = steps if k is None else min(int(k), steps)
        n_nograd = steps if not grad else steps - k
        device, dtype = self.device, self.dtype
        prompt = prompt_embeds.to(device=device, dtype=dtype)
        B = prompt.shape[0]
        shape = (B, cfg.latent_channels, cfg.latent_size, cfg.latent_size)

        # 0. initial noise x_T (seeded by the generator; CPU generators draw on the CPU)
        if noise is None:
            from diffusers.utils.torch_utils import randn_tensor

            noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        if variance_noise is not None and tuple(variance_noise.shape) != (steps, *shape):
            raise ValueError(
                f"variance_noise must have shape {(steps, *shape)}, got "
                f"{tuple(variance_noise.shape)}"
            )
        # (on the meta device, used to count FLOPs and bytes, the timesteps stay on the CPU)
        self.scheduler.set_timesteps(steps, device=device if device.type != "meta" else "cpu")
        timesteps = self.scheduler.timesteps
        if init is None:
            x = noise.to(device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma
        else:
            # image-to-image: the clean start noised to the first timestep that runs
            if tuple(init.shape) != shape:
                raise ValueError(f"init must have shape {shape}, got {tuple(init.shape)}")
            n_run = min(max(int(round(steps * float(strength))), 1), steps)
            timesteps = timesteps[steps - n_run :]
            x = self.scheduler.add_noise(
                init.to(device=device, dtype=torch.float32),
                noise.to(device=device, dtype=torch.float32),
                timesteps[:1].repeat(B),
            )
            n_nograd = len(timesteps) if not grad else max(len(timesteps) - k, 0)
        per_block = self._per_block_checkpointing()
        step_kw: dict[str, Any] = {"generator": generator}

        for i, t in enumerate(timesteps):
            keep_graph = i >= n_nograd
            with torch.set_grad_enabled(keep_graph and torch.is_grad_enabled()):
                # 1. predict the noise eps(x_t, t, prompt) (guided when guidance_scale != 1)
                x_in = self.scheduler.scale_model_input(x, t)
                with self._autocast():
                    eps = self._predict_noise(
                        x_in.to(dtype),
                        t,
                        prompt,
                        use_ckpt=keep_graph and cfg.gradient_checkpointing and not per_block,
                    )
                # 2. DDIM step x_t -> x_{t-1}, in float32 for accuracy
                if variance_noise is not None and cfg.eta > 0:
                    step_kw = {"variance_noise": variance_noise[i].to(device, torch.float32)}
                x = self.scheduler.step(
                    eps.float(), t, x, eta=cfg.eta, return_dict=False, **step_kw
                )[0]

        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            # 3. latent kind: decode with the VAE (differentiable)
            if cfg.kind == "latent":
                with self._autocast():
                    x = self._decode(x.to(self.vae.dtype))
            # 4. [-1, 1] -> [0, 1] -> the classifier's input space
            x01 = ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
            return to_classifier_space(
                x01,
                size=cfg.out_size,
                channels=cfg.out_channels,
                mean=cfg.output_mean,
                std=cfg.output_std,
            )

    def denoising_loss(
        self,
        x0: Tensor,
        prompt_embeds: Tensor,
        *,
        generator: torch.Generator | None = None,
        t_range: tuple[float, float] = (0.2, 0.8),
    ) -> Tensor:
        """Per-image diffusion training loss of clean starts ``x0`` (:meth:`encode`) under
        ``prompt_embeds``: noise each to a random timestep in ``t_range`` (a share of the training
        timesteps) and compare the denoiser's prediction with its target (the noise, or the
        velocity for v-prediction). Textual inversion minimises it over the prompt."""
        sched = self.scheduler
        n_train = int(sched.config.num_train_timesteps)
        gdev = generator.device if generator is not None else torch.device("cpu")
        lo = int(t_range[0] * n_train)
        hi = max(int(t_range[1] * n_train), lo + 1)
        t = torch.randint(lo, hi, (x0.shape[0],), generator=generator, device=gdev)
        noise = torch.randn(x0.shape, generator=generator, device=gdev).to(x0.device)
        t = t.to(x0.device)
        x_t = sched.add_noise(x0.float(), noise, t)
        with self._autocast():
            pred = self.unet(
                x_t.to(self.dtype),
                t,
                encoder_hidden_states=prompt_embeds.to(self.device, self.dtype),
                return_dict=False,
            )[0]
        target = noise
        if sched.config.get("prediction_type", "epsilon") == "v_prediction":
            target = sched.get_velocity(x0.float(), noise, t)
        return (pred.float() - target).pow(2).flatten(1).mean(1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images in the classifier's input space -> clean starts for ``sample(init=...)``.

        Undoes the output normalisation, resizes to the native ``image_size`` and converts to the
        native channels, maps [0, 1] to [-1, 1]; the latent kind then takes the mean of the VAE's
        posterior, scaled (and shifted) as the diffusers pipelines do.
        """
        cfg = self.config
        x01 = from_classifier_space(images.float(), mean=cfg.output_mean, std=cfg.output_std)
        x01 = _convert_channels(_resize(x01.clamp(0.0, 1.0), cfg.image_size), cfg.channels)
        x = (x01 * 2.0 - 1.0).to(self.device)
        if cfg.kind != "latent":
            return x
        with self._autocast():
            z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean.float()
        scale = getattr(self.vae.config, "scaling_factor", 1.0)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * scale

    @torch.no_grad()
    def generate(
        self,
        n: int,
        condition: Tensor,
        *,
        generator: torch.Generator | None = None,
        batch_size: int = 64,
        progress: bool = False,
    ) -> Tensor:
        """Generate ``n`` images without a graph (the project's generator contract).

        Args:
            n: number of images.
            condition: ``(n, L, D)`` prompts, one ``(L, D)`` prompt broadcast to all, or a 1-D
                integer tensor of ``n`` concept ids (rows of :meth:`concept_embeddings`).
            generator: seeds the noise.
            batch_size: images per sampling batch.
            progress: show a tqdm bar.

        Returns:
            ``(n, C_out, H_out, W_out)`` images in the classifier's input space, on the dreamer's
            device.
        """
        from tqdm.auto import tqdm

        if not torch.is_floating_point(condition):
            if condition.dim() != 1 or condition.numel() != n:
                raise ValueError(
                    f"integer condition must be {n} concept ids (1-D), got shape "
                    f"{tuple(condition.shape)}"
                )
            condition = self.concept_embeddings()[condition.to(self.device)]
        if condition.dim() == 2:
            condition = condition.unsqueeze(0).expand(n, -1, -1)
        if condition.dim() != 3 or condition.shape[0] != n:
            raise ValueError(
                f"condition must be (n={n}, L, D), (L, D) or n concept ids; got "
                f"{tuple(condition.shape)}"
            )
        out = []
        starts = range(0, n, max(1, int(batch_size)))
        for s in tqdm(starts, desc="dreaming", disable=not progress, leave=False):
            out.append(self.sample(condition[s : s + batch_size], generator=generator, grad=False))
        if not out:
            return torch.empty((0, *self.output_shape), device=self.device)
        return torch.cat(out)

    # ---- the prompt space ------------------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> Tensor:
        """CLIP-encode captions to ``(len(prompts), L, D)`` prompt embeddings (latent kind only)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise RuntimeError(
                f"encode_text needs a text encoder and tokenizer; this {self.config.kind!r} "
                "dreamer has none. The pixel (glyph) dreamer's prompt space is its concept table: "
                "use concept_embeddings() or random_prompt()."
            )
        if isinstance(prompts, str):
            prompts = [prompts]
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.config.prompt_len,
            truncation=True,
            return_tensors="pt",
        )
        dev = next(self.text_encoder.parameters()).device
        with torch.no_grad():
            out = self.text_encoder(tok.input_ids.to(dev), return_dict=False)[0]
        return out.float().to(self.device)

    def concept_embeddings(self) -> Tensor:
        """``(K, L, D)`` embeddings of the concepts the dreamer knows.

        Pixel kind: its learned concept table (one row per glyph). Latent kind: CLIP embeddings of
        ``config.concept_captions`` (default :data:`DEFAULT_SD_CAPTIONS`), computed once.
        """
        if self.concept_table is not None:
            return self.concept_table
        if self._text_concepts is None:
            if self.text_encoder is None:
                raise RuntimeError(
                    "this dreamer has neither a concept table nor a text encoder, so it knows no "
                    "concepts; load a checkpoint with a text_encoder/tokenizer or pass "
                    "concept_table=..."
                )
            captions = self.config.concept_captions or list(DEFAULT_SD_CAPTIONS)
            self._text_concepts = self.encode_text(captions)
        return self._text_concepts

    def random_prompt(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``(n, L, D)`` random prompts near the concept-embedding distribution.

        Each prompt is a random convex mix of 2..``config.prompt_mix`` distinct concepts
        (Dirichlet(1) weights) plus Gaussian noise of ``config.prompt_noise`` times the
        per-dimension std of the concepts. Drawn on the CPU when the generator is a CPU one.
        """
        table = self.concept_embeddings().float()
        K = table.shape[0]
        gdev = generator.device if generator is not None else table.device
        m_max = max(1, min(int(self.config.prompt_mix), K))
        m_min = min(2, m_max)
        n_mix = torch.randint(m_min, m_max + 1, (n,), generator=generator, device=gdev)
        scores = torch.rand(n, K, generator=generator, device=gdev)
        # m distinct concepts per row: the m largest of K uniform scores
        rank = scores.argsort(dim=1, descending=True).argsort(dim=1)
        chosen = rank < n_mix[:, None]
        w = -torch.log(torch.rand(n, K, generator=generator, device=gdev).clamp_min(1e-12))
        w = (w * chosen).float()
        w = w / w.sum(1, keepdim=True)
        noise = torch.randn(n, *table.shape[1:], generator=generator, device=gdev)
        w, noise = w.to(table.device), noise.to(table.device)
        mix = torch.einsum("nk,kld->nld", w, table)
        std = table.std(0, keepdim=True) if K > 1 else table.abs().mean().expand_as(table[:1])
        return (mix + self.config.prompt_noise * std * noise).detach()

    def reference_network(self) -> ReferenceNetwork | None:
        """Frozen classifier independent of the continual learner, for D2L's oracle.

        The one given to :meth:`set_reference`; else, pixel (glyph) dreamer: the glyph classifier
        trained and saved with it; latent kind: torchvision's ImageNet ResNet-50 when its weights
        are in the local torch hub cache, else ``None`` with one warning (nothing is downloaded;
        :meth:`reference_info` says why). It takes images as :meth:`sample` returns them.
        """
        if self._reference is None and self.config.kind == "latent" and not self._reference_missing:
            ref, why = _load_imagenet_reference(self.config, self.device)
            if ref is None:
                self._reference_missing = why
                warnings.warn(why, stacklevel=2)
            else:
                self._reference = ref
                self._reference_source = "torchvision resnet50 ImageNet (torch hub cache)"
        return self._reference

    def set_reference(
        self, source: str | os.PathLike | nn.Module, *, local_files_only: bool | None = None
    ) -> ReferenceNetwork:
        """Use another reference network for the oracle (see :func:`load_reference_network`).

        Args:
            source: a torchvision ResNet-50 state-dict file, a transformers image-classification
                directory or hub id, or a module already wrapped as :class:`ReferenceNetwork`.
            local_files_only: forwarded to transformers for hub ids.
        """
        if isinstance(source, ReferenceNetwork):
            ref, name = source, type(source.net).__name__
        else:
            ref = load_reference_network(
                source, config=self.config, device=self.device, local_files_only=local_files_only
            )
            name = str(source)
        self._reference = ref.to(self.device)
        self._reference_source = name
        self._reference_missing = None
        return self._reference

    def reference_info(self) -> dict[str, Any]:
        """JSON-able state of the reference network: present or not, where from, why absent."""
        ref = self._reference
        return {
            "present": ref is not None,
            "source": self._reference_source if ref is not None else None,
            "num_classes": len(ref.class_names) if ref is not None and ref.class_names else None,
            "missing_reason": self._reference_missing if ref is None else None,
        }

    # ---- persistence ---------------------------------------------------------------------------

    def save_pretrained(
        self, path: str | os.PathLike, *, training_info: dict | None = None
    ) -> Path:
        """Save config, weights, scheduler, concepts and reference network to a directory.

        The layout: ``dreamer_config.json``, ``unet/``, ``scheduler/``, (``vae/``,
        ``text_encoder/``, ``tokenizer/``), ``concepts.pt``, ``reference/``,
        ``training_info.json`` (when given or already attached).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
        self.unet.save_pretrained(path / "unet")
        self.scheduler.save_pretrained(path / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(path / "vae")
        if self.text_encoder is not None:
            self.text_encoder.save_pretrained(path / "text_encoder")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path / "tokenizer")
        torch.save(
            {
                "concept_table": None if self.concept_table is None else self.concept_table.cpu(),
                "null_prompt": None if self.null_prompt is None else self.null_prompt.cpu(),
            },
            path / CONCEPTS_NAME,
        )
        ref = self._reference
        if ref is not None and ref._saveable is not None:
            ref_dir = path / REFERENCE_DIR
            ref_dir.mkdir(exist_ok=True)
            torch.save({k: v.cpu() for k, v in ref.net.state_dict().items()}, ref_dir / "model.pt")
            spec = dict(ref._saveable)
            spec.update(
                in_size=ref.in_size,
                in_channels=ref.in_channels,
                in_mean=ref.in_mean,
                in_std=ref.in_std,
                class_names=ref.class_names,
            )
            (ref_dir / "reference.json").write_text(json.dumps(spec, indent=2))
        info = training_info if training_info is not None else getattr(self, "training_info", None)
        if info is not None:
            self.training_info = info
            (path / TRAINING_INFO_NAME).write_text(json.dumps(info, indent=2))
        return path

    @classmethod
    def from_config(
        cls,
        config: DreamerConfig,
        unet_config: dict | None = None,
        *,
        num_concepts: int = 8,
        scheduler_config: dict | None = None,
        vae_config: dict | None = None,
        seed: int = 0,
    ) -> Dreamer:
        """Randomly initialised dreamer (tests, or the start of pretraining).

        Args:
            config: the dreamer config; the UNet gets ``sample_size=latent_size``,
                ``in/out_channels=latent_channels``, ``cross_attention_dim=prompt_dim``.
            unet_config: extra ``UNet2DConditionModel`` arguments (e.g. ``block_out_channels``).
            num_concepts: rows of the random concept table (pixel kind).
            scheduler_config: ``DDIMScheduler`` arguments.
            vae_config: ``AutoencoderKL`` arguments (latent kind).
            seed: seeds the initialisation.
        """
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            u = dict(default_unet_config(config))
            u.update(unet_config or {})
            u.update(
                sample_size=config.latent_size,
                in_channels=config.latent_channels,
                out_channels=config.latent_channels,
                cross_attention_dim=config.prompt_dim,
            )
            unet = UNet2DConditionModel(**u)
            sched = DDIMScheduler(**_default_scheduler_config(scheduler_config))
            vae = None
            if config.kind == "latent":
                v = dict(vae_config or {})
                v.setdefault("in_channels", config.channels)
                v.setdefault("out_channels", config.channels)
                v.setdefault("latent_channels", config.latent_channels)
                vae = AutoencoderKL(**v)
                scale = 2 ** (len(vae.config.block_out_channels) - 1)
                if config.latent_size * scale != config.image_size:
                    raise ValueError(
                        f"latent_size={config.latent_size} x VAE scale {scale} != "
                        f"image_size={config.image_size}; fix the config"
                    )
            L, D = config.prompt_len, config.prompt_dim
            table = torch.randn(num_concepts, L, D) if num_concepts else None
            null = torch.zeros(L, D) if config.has_null_prompt else None
        finally:
            torch.random.set_rng_state(gen_state)
        return cls(
            config=config,
            unet=unet,
            scheduler=sched,
            vae=vae,
            concept_table=table,
            null_prompt=null,
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        local_files_only: bool | None = None,
        resolution: int | None = None,
        **overrides: Any,
    ) -> Dreamer:
        """Load a dreamer.

        Args:
            path_or_id: a directory written by :meth:`save_pretrained`; or a diffusers
                Stable-Diffusion-family directory / hub id (``unet/``, ``vae/``, ``scheduler/``,
                optional ``text_encoder/`` + ``tokenizer/``).
            torch_dtype: weights dtype; ``None``: the compute dtype of the resolved
                ``mixed_precision`` on a GPU (bf16 for ``"auto"``), float32 on CPU.
            device: where to put it (``None``: CUDA when available); may differ from the
                learner's device (images are moved to the learner while dreaming).
            local_files_only: forwarded to diffusers/transformers (``None``: their default).
            resolution: the learner's image side: a latent dreamer then works at
                ``latent_size_for(resolution)`` latents (32x32 for 84-256 px) and
                ``output_size`` defaults to ``resolution``. Explicit ``latent_size`` /
                ``image_size`` / ``output_size`` overrides win; a ``latent_size`` that does not
                decode to ``image_size`` is an error.
            **overrides: :class:`DreamerConfig` fields to override (e.g. ``num_inference_steps``,
                ``output_size``, ``output_channels``, ``output_mean``, ``output_std``,
                ``guidance_scale``, ``mixed_precision``).

        Raises:
            ValueError: unknown override names.
            OSError: the checkpoint cannot be found (message says what to do).
        """
        valid = {f.name for f in dataclasses.fields(DreamerConfig)}
        bad = sorted(set(overrides) - valid)
        if bad:
            raise ValueError(f"unknown DreamerConfig overrides {bad}; valid: {sorted(valid)}")
        path = Path(path_or_id)
        dev = resolve_device(device)
        ours = (path / CONFIG_NAME).is_file()
        if torch_dtype is None and dev.type == "cuda":
            saved = json.loads((path / CONFIG_NAME).read_text()) if ours else {}
            wanted = overrides.get("mixed_precision", saved.get("mixed_precision", "auto"))
            torch_dtype = precision_dtype(resolve_precision(wanted, dev))
        if ours:
            dreamer = cls._load_ours(
                path, torch_dtype=torch_dtype, overrides=overrides, resolution=resolution
            )
        else:
            dreamer = cls._load_diffusers(
                str(path_or_id),
                torch_dtype=torch_dtype,
                overrides=overrides,
                local_files_only=local_files_only,
                resolution=resolution,
            )
        return dreamer.to(dev)

    @classmethod
    def _load_ours(cls, path: Path, *, torch_dtype, overrides: dict, resolution=None) -> Dreamer:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        unet = UNet2DConditionModel.from_pretrained(path / "unet", **kw)
        sched = DDIMScheduler.from_pretrained(path / "scheduler")
        vae = AutoencoderKL.from_pretrained(path / "vae", **kw) if (path / "vae").is_dir() else None
        cfg_dict = json.loads((path / CONFIG_NAME).read_text())
        scale = _vae_scale(vae) if vae is not None else None
        cfg_dict.update(_resolution_overrides(resolution, scale, overrides))
        config = DreamerConfig.from_dict(cfg_dict)
        text_encoder, tokenizer = _load_text(path, kw, local_files_only=True, subfolders=False)
        concepts = torch.load(path / CONCEPTS_NAME, map_location="cpu", weights_only=True)
        reference = _load_reference(path / REFERENCE_DIR, config)
        dreamer = cls(
            config=config,
            unet=unet,
            scheduler=sched,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            concept_table=concepts.get("concept_table"),
            null_prompt=concepts.get("null_prompt"),
            reference=reference,
        )
        info_path = path / TRAINING_INFO_NAME
        if info_path.is_file():
            dreamer.training_info = json.loads(info_path.read_text())
        return dreamer

    @classmethod
    def _load_diffusers(
        cls,
        path_or_id: str,
        *,
        torch_dtype,
        overrides: dict,
        local_files_only: bool | None,
        resolution: int | None = None,
    ) -> Dreamer:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        kw: dict[str, Any] = {}
        if torch_dtype is not None:
            kw["torch_dtype"] = torch_dtype
        if local_files_only is not None:
            kw["local_files_only"] = local_files_only
        try:
            unet = UNet2DConditionModel.from_pretrained(path_or_id, subfolder="unet", **kw)
            vae = AutoencoderKL.from_pretrained(path_or_id, subfolder="vae", **kw)
            sched_kw = {k: v for k, v in kw.items() if k != "torch_dtype"}
            # any SD scheduler config (PNDM, DDIM, Euler...) becomes DDIM with the same betas
            sched = DDIMScheduler.from_pretrained(path_or_id, subfolder="scheduler", **sched_kw)
        except (OSError, ValueError) as err:
            raise OSError(
                f"could not load a dreamer from {path_or_id!r}: it is neither a directory written "
                "by Dreamer.save_pretrained (no dreamer_config.json) nor a loadable diffusers "
                "Stable-Diffusion layout (unet/, vae/, scheduler/). Pass a local path, or a hub id "
                "with internet access / a filled HF cache. For the offline default use "
                "avalanche_d2l.dreaming.load_or_pretrain_offline_dreamer(). "
                f"Underlying error: {err}"
            ) from err
        text_encoder, tokenizer = _load_text(path_or_id, kw, local_files_only, subfolders=True)
        scale = _vae_scale(vae)
        prompt_len = int(tokenizer.model_max_length) if tokenizer is not None else 77
        cfg_dict = {
            "kind": "latent",
            "latent_size": int(unet.config.sample_size),
            "channels": int(vae.config.out_channels),
            "prompt_len": prompt_len,
            "prompt_dim": int(unet.config.cross_attention_dim),
            "latent_channels": int(unet.config.in_channels),
            "has_null_prompt": text_encoder is not None,
        }
        cfg_dict.update(_resolution_overrides(resolution, scale, overrides))
        cfg_dict.setdefault("image_size", cfg_dict["latent_size"] * scale)
        config = DreamerConfig.from_dict(cfg_dict)
        dreamer = cls(
            config=config,
            unet=unet,
            scheduler=sched,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )
        if text_encoder is not None:
            dreamer.null_prompt = dreamer.encode_text([""])[0].float()
        elif config.guidance_scale != 1.0:
            raise ValueError(
                f"guidance_scale={config.guidance_scale} needs a text encoder for the empty "
                f"prompt, and {path_or_id!r} has none; use guidance_scale=1.0"
            )
        return dreamer

    # ---- pickling (dill / copy.deepcopy): nothing un-picklable is stored -------------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_text_concepts"] = None
        return state


# ------------------------------------------------------------------------------------------------
# helpers


def _vae_scale(vae: nn.Module) -> int:
    """Pixels per latent side of an ``AutoencoderKL`` (one halving per extra block)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _resolution_overrides(resolution: int | None, scale: int | None, overrides: dict) -> dict:
    """Config overrides for a learner of side ``resolution`` (explicit ``overrides`` win)."""
    out = dict(overrides)
    if resolution is None:
        return out
    out.setdefault("output_size", int(resolution))
    if scale is not None:  # latent kind
        latent = out.setdefault("latent_size", latent_size_for(int(resolution), scale))
        out.setdefault("image_size", int(latent) * scale)
    return out


def default_unet_config(config: DreamerConfig | None = None) -> dict[str, Any]:
    """A small pixel-space ``UNet2DConditionModel`` config (the offline glyph dreamer's)."""
    return {
        "block_out_channels": (32, 64, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def _default_scheduler_config(overrides: dict | None) -> dict[str, Any]:
    d = {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "clip_sample": True,
        "prediction_type": "epsilon",
        "set_alpha_to_one": True,
        "timestep_spacing": "trailing",
    }
    d.update(overrides or {})
    return d


def _load_text(src, kw: dict, local_files_only: bool | None, *, subfolders: bool):
    """Optional CLIP text encoder + tokenizer (``text_encoder/``, ``tokenizer/``)."""
    try:
        # CLIPTokenizer, not AutoTokenizer: with transformers 5 AutoTokenizer fails on the
        # tokenizer/ folder of Stable Diffusion repos (no tokenizer class in its config)
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None, None
    if not subfolders:
        src = Path(src)
        if not (src / "text_encoder").is_dir():
            return None, None
        enc = CLIPTextModel.from_pretrained(src / "text_encoder", **kw)
        tok = (
            CLIPTokenizer.from_pretrained(src / "tokenizer")
            if (src / "tokenizer").is_dir()
            else None
        )
        return enc, tok
    tkw = {"local_files_only": local_files_only} if local_files_only is not None else {}
    try:
        enc = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw)
        tok = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **tkw)
    except (OSError, ValueError) as err:
        warnings.warn(
            f"{src!r}: no loadable text_encoder/ + tokenizer/ ({err}); the dreamer works with "
            "prompt tensors only (no encode_text, concept_embeddings or CFG).",
            stacklevel=3,
        )
        return None, None
    return enc, tok


def _load_reference(ref_dir: Path, config: DreamerConfig) -> ReferenceNetwork | None:
    if not (ref_dir / "reference.json").is_file():
        return None
    spec = json.loads((ref_dir / "reference.json").read_text())
    arch = spec.get("arch")
    if arch != "small_cnn":
        raise ValueError(f"{ref_dir}: unknown reference architecture {arch!r} (expected small_cnn)")
    from ..models.classifiers import small_cnn

    net = small_cnn(
        num_classes=spec["num_classes"], in_channels=spec["in_channels"], width=spec["width"]
    )
    net.load_state_dict(torch.load(ref_dir / "model.pt", map_location="cpu", weights_only=True))
    return make_reference(net, spec=spec, config=config)


def make_reference(net: nn.Module, *, spec: dict, config: DreamerConfig) -> ReferenceNetwork:
    """Wrap a trained glyph classifier as the dreamer's reference network (saved with it).

    ``spec`` holds ``arch``, ``num_classes``, ``in_channels``, ``width``, ``in_size`` and
    optionally ``in_mean``/``in_std``/``class_names``.
    """
    ref = ReferenceNetwork(
        net=net,
        in_size=spec["in_size"],
        in_channels=spec["in_channels"],
        in_mean=spec.get("in_mean"),
        in_std=spec.get("in_std"),
        src_mean=config.output_mean,
        src_std=config.output_std,
        class_names=spec.get("class_names"),
    )
    ref._saveable = {k: spec[k] for k in ("arch", "num_classes", "width")}
    return ref


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _torchvision_resnet50(path: Path, config: DreamerConfig) -> ReferenceNetwork:
    from torchvision.models import ResNet50_Weights, resnet50

    net = resnet50()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"{path} is not a torchvision ResNet-50 state dict ({str(err)[:200]}); pass a "
            "torchvision resnet50 .pth file, or a transformers image-classification directory "
            "or hub id"
        ) from err
    return ReferenceNetwork(
        net=net,
        in_size=224,
        in_channels=3,
        in_mean=_IMAGENET_MEAN,
        in_std=_IMAGENET_STD,
        src_mean=config.output_mean,
        src_std=config.output_std,
        class_names=list(ResNet50_Weights.DEFAULT.meta["categories"]),
    )


class _LogitsOnly(nn.Module):
    """A transformers image classifier as ``images -> logits``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).logits


def _transformers_classifier(
    source: str, config: DreamerConfig, local_files_only: bool | None
) -> ReferenceNetwork:
    from transformers import AutoConfig, AutoModelForImageClassification

    kw = {"local_files_only": local_files_only} if local_files_only is not None else {}
    model = AutoModelForImageClassification.from_pretrained(source, **kw)
    mean, std, size = _IMAGENET_MEAN, _IMAGENET_STD, 224
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(source, **kw)
        mean = tuple(getattr(proc, "image_mean", None) or mean)
        std = tuple(getattr(proc, "image_std", None) or std)
        sz = getattr(proc, "crop_size", None) or getattr(proc, "size", None) or {}
        sz = dict(sz) if not isinstance(sz, int) else {"height": sz}
        size = int(sz.get("height") or sz.get("shortest_edge") or size)
    except (OSError, ValueError):
        pass  # no preprocessor config: ImageNet normalisation at 224 px
    cfg = AutoConfig.from_pretrained(source, **kw)
    labels = getattr(cfg, "id2label", None) or {}
    return ReferenceNetwork(
        net=_LogitsOnly(model),
        in_size=size,
        in_channels=int(getattr(cfg, "num_channels", 3)),
        in_mean=mean,
        in_std=std,
        src_mean=config.output_mean,
        src_std=config.output_std,
        class_names=[labels[i] for i in sorted(labels)] if labels else None,
    )


def load_reference_network(
    source: str | os.PathLike,
    *,
    config: DreamerConfig,
    device: str | torch.device = "cpu",
    local_files_only: bool | None = None,
) -> ReferenceNetwork:
    """Load the oracle's reference network from a path or a hub id.

    Args:
        source: a file (``.pth``/``.pt``/``.safetensors``): torchvision ResNet-50 ImageNet
            weights; a directory with ``config.json``, or a hub id: a transformers
            image-classification model (e.g. ``microsoft/resnet-50``), normalised as its
            preprocessor config says.
        config: the dreamer's config (the reference undoes its output normalisation).
        device: where to put it.
        local_files_only: forwarded to transformers.

    Raises:
        OSError: nothing loadable at ``source``.
    """
    path = Path(source)
    try:
        if path.is_file():
            ref = _torchvision_resnet50(path, config)
        else:
            ref = _transformers_classifier(str(source), config, local_files_only)
    except OSError as err:
        raise OSError(
            f"no reference network at {str(source)!r}: give a torchvision ResNet-50 .pth file, "
            "a transformers image-classification directory, or a hub id reachable from here "
            f"(or in the HF cache). Underlying error: {err}"
        ) from err
    return ref.to(device)


def _load_imagenet_reference(
    config: DreamerConfig, device: torch.device
) -> tuple[ReferenceNetwork | None, str]:
    """torchvision ResNet-50 (ImageNet) from the local torch hub cache, or ``(None, why)``."""
    try:
        from torchvision.models import ResNet50_Weights
    except ImportError:  # pragma: no cover
        return None, "no reference network: torchvision is not installed"
    fname = os.path.basename(ResNet50_Weights.DEFAULT.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if not cached.is_file():
        return None, (
            f"no reference network: torchvision's ResNet-50 ImageNet weights are not in the local "
            f"torch hub cache ({cached}); nothing is downloaded. Put the file there, or give "
            "DreamConfig.oracle_reference (a .pth path or a transformers hub id), to enable the "
            "reference checks of D2L's oracle."
        )
    return _torchvision_resnet50(cached, config).to(device), ""
