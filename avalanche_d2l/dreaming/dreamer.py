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

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .accel import autocast, resolve_precision
from .concepts import DreamerPrompts
from .config import (
    CONCEPTS_NAME,
    CONFIG_NAME,
    DEFAULT_SD_CAPTIONS,
    REFERENCE_DIR,
    TRAINING_INFO_NAME,
    DreamerConfig,
    _convert_channels,
    _resize,
    from_classifier_space,
    latent_size_for,
    to_classifier_space,
)
from .loading import DreamerIO, _vae_scale, default_unet_config
from .reference import (
    DreamerReference,
    ReferenceNetwork,
    load_reference_network,
    make_reference,
)

__all__ = [
    "CONCEPTS_NAME",
    "CONFIG_NAME",
    "DEFAULT_SD_CAPTIONS",
    "REFERENCE_DIR",
    "TRAINING_INFO_NAME",
    "Dreamer",
    "DreamerConfig",
    "ReferenceNetwork",
    "default_unet_config",
    "from_classifier_space",
    "latent_size_for",
    "load_reference_network",
    "make_reference",
    "to_classifier_space",
]


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
# the dreamer


class Dreamer(DreamerIO, DreamerPrompts, DreamerReference, nn.Module):
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
        repeats: int = 1,
    ) -> Tensor:
        """Per-image diffusion training loss of clean starts ``x0`` (:meth:`encode`) under
        ``prompt_embeds``: noise each to a random timestep in ``t_range`` (a share of the training
        timesteps) and compare the denoiser's prediction with its target (the noise, or the
        velocity for v-prediction). Textual inversion minimises it over the prompt.

        With ``repeats`` r, ``prompt_embeds`` holds r prompts for each of the n images (r * n
        rows, prompt-major) and every prompt sees the same timesteps and noise, drawn once for
        the n images: r prompts scored on the same noisy images in one call (what r calls with
        the generator re-seeded each time would give)."""
        sched = self.scheduler
        n_train = int(sched.config.num_train_timesteps)
        gdev = generator.device if generator is not None else torch.device("cpu")
        lo = int(t_range[0] * n_train)
        hi = max(int(t_range[1] * n_train), lo + 1)
        t = torch.randint(lo, hi, (x0.shape[0],), generator=generator, device=gdev)
        noise = torch.randn(x0.shape, generator=generator, device=gdev).to(x0.device)
        t = t.to(x0.device)
        x0 = x0.float()
        if repeats > 1:
            x0, noise, t = (v.repeat(repeats, *([1] * (v.dim() - 1))) for v in (x0, noise, t))
        x_t = sched.add_noise(x0, noise, t)
        with self._autocast():
            pred = self.unet(
                x_t.to(self.dtype),
                t,
                encoder_hidden_states=prompt_embeds.to(self.device, self.dtype),
                return_dict=False,
            )[0]
        target = noise
        if sched.config.get("prediction_type", "epsilon") == "v_prediction":
            target = sched.get_velocity(x0, noise, t)
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

    # ---- persistence ---------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_text_concepts"] = None
        return state
