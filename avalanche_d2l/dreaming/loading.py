"""Saving and loading dreamers: our own folders, diffusers Stable Diffusion layouts (local or
hub ids, tokenizer via ``CLIPTokenizer``), and random ones built from configs (tests, the start of
pretraining). :class:`DreamerIO` holds them as the Dreamer's class methods."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..utils import resolve_device
from .accel import precision_dtype, resolve_precision
from .config import (
    CONCEPTS_NAME,
    CONFIG_NAME,
    REFERENCE_DIR,
    TRAINING_INFO_NAME,
    DreamerConfig,
    latent_size_for,
)
from .reference import _load_reference

if TYPE_CHECKING:
    from .dreamer import Dreamer

__all__ = ["DreamerIO", "default_unet_config"]


class DreamerIO:
    """Persistence of :class:`~avalanche_d2l.dreaming.dreamer.Dreamer` (mixed into it)."""

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
