"""Pretrain (or load from cache) the offline glyph dreamer.

With no downloadable weights, the CPU default needs its own frozen text-to-image-like model: a small
pixel-space ``UNet2DConditionModel`` trained with the DDPM objective on font glyphs
(:mod:`avalanche_d2l.dreaming.glyphs`; no digits). Its conditioning comes from a learned concept
table ``(K, L, D)`` -- the stand-in for a text encoder's output space -- with a learned null prompt
for classifier-free guidance (label dropout). Small Gaussian noise on the conditioning during
training keeps the neighbourhood of every concept (and mixes of concepts) meaningful, which is
where D2L's soft prompts live.

A small reference glyph classifier is trained on the same data and saved alongside: D2L's oracle
uses it as a judge independent of the continual learner. ``training_info.json`` records what the
model saw (fonts, glyphs, augmentation), the settings, the loss curve, and the reference
classifier's accuracy on class-conditional dreamer samples (the "are samples recognisable" check).

Where a dreamer comes from (:func:`load_or_pretrain_offline_dreamer`):

1. **shipped** -- the package carries the pretrained 16 px grey glyph dreamer
   (``avalanche_d2l/data/dreamers/``, with the command that made it, its settings and the sha256 of
   every file); a request whose settings match it gets it, so every machine dreams with the same
   weights;
2. **cache** -- other settings are pretrained once into ``$AVALANCHE_D2L_CACHE`` (default
   ``~/.cache/avalanche_d2l``), in a folder named by a readable prefix plus a hash of every setting
   that changes the weights (:func:`dreamer_key`).

The learner's image shape never needs its own pretraining: the dreamer generates at its native
size and channels and maps its output to the learner's (``DreamerConfig.output_size`` /
``output_channels``: bilinear resize, grey repeated to RGB or RGB to luminance).

Every folder is written into a temporary sibling and renamed into place, with ``manifest.json``
(file hashes) written last; a folder that fails its hashes or does not load is reported with its
path, moved aside and rebuilt.

Command line (wired as ``avalanche-d2l pretrain-dreamer``)::

    avalanche-d2l pretrain-dreamer [--out DIR] [--steps N] [--image-size 16] [--channels 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..utils import resolve_device
from .dreamer import (
    CONFIG_NAME,
    Dreamer,
    DreamerConfig,
    _default_scheduler_config,
    default_unet_config,
    make_reference,
)
from .glyphs import DEFAULT_GLYPHS, GlyphBank, GlyphConfig

__all__ = [
    "MANIFEST_NAME",
    "DreamerFolderError",
    "NATIVE_SIZE",
    "PretrainConfig",
    "default_cache_dir",
    "dreamer_key",
    "evaluate_dreamer",
    "load_or_pretrain_offline_dreamer",
    "main",
    "offline_dreamer_available",
    "pretrain_command",
    "pretrain_offline_dreamer",
    "resolve_pretrain_config",
    "shipped_dreamers",
    "verify_dreamer_dir",
    "weights_digest",
]

logger = logging.getLogger(__name__)

#: bump when the training recipe changes, so stale caches are not reused
RECIPE_VERSION = 1


@dataclass
class PretrainConfig:
    """Settings of the offline glyph dreamer's pretraining (saved in ``training_info.json``).

    Attributes:
        image_size: image side (16 matches ``split_digits``' default).
        steps: DDPM training steps of the denoiser.
        batch_size: glyph images per step.
        lr: peak AdamW learning rate (linear warm-up, cosine decay to 10%).
        seed: seeds glyph sampling and initialisation (through ``accelerate.utils.set_seed``).
        prompt_len: ``L`` tokens per concept embedding.
        prompt_dim: ``D`` width (the UNet's cross-attention dimension).
        block_out_channels: UNet widths (one entry per resolution level).
        null_prob: label-dropout rate: the null prompt replaces the concept (enables CFG).
        embed_noise: std of the noise added to concept embeddings during training, relative to
            the table's per-dimension std.
        ema_decay: decay of the weight average that is saved (0 disables it).
        reference_steps: training steps of the reference glyph classifier.
        reference_width: width of the reference ``SmallCNN``.
        eval_per_class: dreamer samples per concept for the recognisability check.
        num_inference_steps: DDIM steps stored as the dreamer's default.
        guidance_scale: CFG weight stored as the dreamer's default.
        prediction_type: ``"v_prediction"`` (default: stable x0 estimates at the few, large DDIM
            steps the prompt optimisation uses) or ``"epsilon"``.
    """

    image_size: int = 16
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    prompt_len: int = 4
    prompt_dim: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    null_prob: float = 0.1
    embed_noise: float = 0.1
    ema_decay: float = 0.995
    reference_steps: int = 600
    reference_width: int = 32
    eval_per_class: int = 4
    num_inference_steps: int = 4
    guidance_scale: float = 1.0
    prediction_type: str = "v_prediction"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (tuples as lists)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused with the valid ones listed."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown PretrainConfig fields {unknown}; valid fields: {sorted(names)}"
            )
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def fingerprint(self) -> str:
        """sha256 of :meth:`to_dict`: every field can change the saved dreamer."""
        return _sha256_json(self.to_dict())


#: native side of the shipped offline dreamer; learners of other sizes get its images resized
NATIVE_SIZE = 16
#: written last into every dreamer folder: settings, key, the command, sha256 of every file
MANIFEST_NAME = "manifest.json"
#: the files that hold weights (their sha256 is the folder's ``weights_sha256``)
WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "concepts.pt", "reference/model.pt")
#: where the package's pretrained dreamers live (package data)
SHIPPED_ROOT = Path(__file__).resolve().parents[1] / "data" / "dreamers"


def _sha256_json(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$AVALANCHE_D2L_CACHE`` or ``~/.cache/avalanche_d2l``."""
    env = os.environ.get("AVALANCHE_D2L_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "avalanche_d2l"


def _unet_config(pc: PretrainConfig) -> dict:
    n = len(pc.block_out_channels)
    u = default_unet_config(None)
    u.update(
        block_out_channels=tuple(pc.block_out_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        norm_num_groups=min(8, min(pc.block_out_channels)),
    )
    return u


def _lr_at(step: int, total: int, peak: float) -> float:
    warm = max(1, min(100, total // 10))
    if step < warm:
        return peak * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _train_reference(bank: GlyphBank, pc: PretrainConfig, gen: torch.Generator, progress: bool):
    from tqdm.auto import tqdm

    from ..models.classifiers import small_cnn

    net = small_cnn(
        num_classes=bank.num_classes, in_channels=bank.channels, width=pc.reference_width
    )
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in tqdm(range(pc.reference_steps), desc="reference classifier", disable=not progress):
        x, y = bank.sample(128, generator=gen)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        x, y = bank.sample(1024, generator=gen)
        acc = (net(x).argmax(1) == y).float().mean().item()
    return net, acc


@torch.no_grad()
def evaluate_dreamer(
    dreamer: Dreamer,
    *,
    per_class: int = 4,
    seed: int = 0,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
) -> float:
    """Reference-classifier accuracy on class-conditional dreamer samples (chance = 1/K).

    Samples ``per_class`` images of every concept from its concept embedding and asks the saved
    reference glyph classifier which concept it sees.
    """
    ref = dreamer.reference_network()
    if ref is None:
        raise RuntimeError("this dreamer has no reference network to evaluate its samples")
    table = dreamer.concept_embeddings()
    K = table.shape[0]
    ids = torch.arange(K).repeat_interleave(per_class)
    old = (dreamer.config.guidance_scale, dreamer.config.num_inference_steps)
    try:
        if guidance_scale is not None:
            dreamer.config.guidance_scale = guidance_scale
        if num_inference_steps is not None:
            dreamer.config.num_inference_steps = num_inference_steps
        gen = torch.Generator().manual_seed(seed)
        x = dreamer.generate(len(ids), ids, generator=gen, batch_size=256)
    finally:
        dreamer.config.guidance_scale, dreamer.config.num_inference_steps = old
    pred = ref(x).argmax(1).cpu()
    return (pred == ids).float().mean().item()


def pretrain_offline_dreamer(
    out_dir: str | os.PathLike,
    *,
    image_size: int = 16,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    config: PretrainConfig | None = None,
    glyph_config: GlyphConfig | None = None,
    channels: int = 1,
    lr: float | None = None,
) -> Dreamer:
    """Pretrain the glyph dreamer and its reference classifier on CPU; save to ``out_dir``.

    The folder is written whole or not at all: training and saving happen in a temporary sibling
    that replaces ``out_dir`` at the end (an interruption leaves ``out_dir`` as it was; an
    existing dreamer folder is replaced as a whole, so no stale file survives).

    Args:
        out_dir: directory to write (``Dreamer.save_pretrained`` layout + ``samples.png``,
            ``TRAINED_ON.md`` and ``manifest.json``); it must be new, empty or a dreamer folder.
        image_size: native image side of the dreamer.
        steps: denoiser training steps (default ``PretrainConfig.steps``).
        batch_size: images per step (default ``PretrainConfig.batch_size``).
        seed: seed of everything.
        progress: tqdm bars.
        config: full settings (``image_size``/``seed`` and the given ``steps``/``batch_size``/
            ``lr`` override it).
        glyph_config: the glyph world's settings (default :class:`GlyphConfig`).
        channels: 1 (grey glyphs) or 3 (each glyph in its own colours on its own background).
        lr: peak learning rate (default ``PretrainConfig.lr``).

    Returns:
        The frozen :class:`Dreamer` (on the CPU), with ``training_info`` attached.

    Raises:
        ValueError: an invalid setting, or ``out_dir`` is a file or a non-empty folder that is
            not a dreamer folder.
        OSError: ``out_dir``'s parent cannot be created or written.
    """
    pc, gc = resolve_pretrain_config(
        image_size=image_size,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        lr=lr,
        config=config,
        glyph_config=glyph_config,
        channels=channels,
    )
    out_dir = Path(out_dir)
    tmp = _make_temp_sibling(out_dir)  # fails here, before any work, when out_dir is unusable
    try:
        dreamer = _train(tmp, pc, gc, progress)
        _write_manifest(tmp, pc, gc, weights_digest(dreamer))
        _replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dreamer


def _train(out_dir: Path, pc: PretrainConfig, gc: GlyphConfig, progress: bool) -> Dreamer:
    from accelerate.utils import set_seed
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from tqdm.auto import tqdm

    t_start = time.time()
    set_seed(pc.seed)
    gen = torch.Generator().manual_seed(pc.seed)

    bank = GlyphBank(gc)
    C = bank.channels
    K, L, D = bank.num_classes, pc.prompt_len, pc.prompt_dim

    # the denoiser, the concept table ("text-embedding space") and the null prompt
    unet_kwargs = _unet_config(pc)
    unet = UNet2DConditionModel(
        sample_size=pc.image_size,
        in_channels=C,
        out_channels=C,
        cross_attention_dim=D,
        **unet_kwargs,
    )
    table = nn.Parameter(torch.randn(K, L, D, generator=gen))
    null = nn.Parameter(torch.zeros(L, D))
    ddim = DDIMScheduler(**_default_scheduler_config({"prediction_type": pc.prediction_type}))
    ddpm = DDPMScheduler.from_config(ddim.config)  # same betas: train with DDPM, sample with DDIM
    params = [*unet.parameters(), table, null]
    ema = [p.detach().clone() for p in params] if pc.ema_decay > 0 else None
    opt = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "weight_decay": 1e-4},
            {"params": [table, null], "weight_decay": 0.0},
        ],
        lr=pc.lr,
    )
    acp = ddpm.alphas_cumprod

    losses: list[float] = []
    unet.train()
    bar = tqdm(range(pc.steps), desc="pretraining glyph dreamer", disable=not progress)
    for step in bar:
        # 1. a batch of jittered glyphs, scaled to [-1, 1]
        x0, y = bank.sample(pc.batch_size, generator=gen)
        x0 = x0 * 2 - 1
        # 2. forward diffusion: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        # 3. conditioning: noisy concept embedding, or the null prompt (label dropout)
        std = table.detach().std(0, keepdim=True)
        cond = table[y] + pc.embed_noise * std * torch.randn(len(y), L, D, generator=gen)
        drop = torch.rand(len(y), generator=gen) < pc.null_prob
        cond = torch.where(drop.view(-1, 1, 1), null.expand(len(y), L, D), cond)
        # 4. regression loss on eps, or on v = sqrt(a) eps - sqrt(1 - a) x0
        target = eps if pc.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        pred = unet(xt, t, encoder_hidden_states=cond, return_dict=False)[0]
        loss = F.mse_loss(pred, target)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, pc.steps, pc.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            d = min(pc.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{sum(losses[-25:]) / len(losses[-25:]):.4f}")
    train_s = time.time() - t_start
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)

    ref_net, ref_acc_real = _train_reference(bank, pc, gen, progress)
    dcfg = DreamerConfig(
        kind="pixel",
        image_size=pc.image_size,
        channels=C,
        prompt_len=L,
        prompt_dim=D,
        num_inference_steps=pc.num_inference_steps,
        guidance_scale=pc.guidance_scale,
        concept_names=list(bank.class_names),
    )
    spec = {
        "arch": "small_cnn",
        "num_classes": K,
        "in_channels": C,
        "width": pc.reference_width,
        "in_size": pc.image_size,
        "in_mean": None,
        "in_std": None,
        "class_names": list(bank.class_names),
    }
    dreamer = Dreamer(
        config=dcfg,
        unet=unet,
        scheduler=ddim,
        concept_table=table.detach(),
        null_prompt=null.detach(),
        reference=make_reference(ref_net, spec=spec, config=dcfg),
    )

    # recognisability: reference accuracy on class-conditional samples (chance = 1/K)
    sample_acc = {
        f"steps{s}_cfg{g:g}": evaluate_dreamer(
            dreamer,
            per_class=pc.eval_per_class,
            seed=pc.seed,
            guidance_scale=g,
            num_inference_steps=s,
        )
        for s, g in ((pc.num_inference_steps, 1.0), (pc.num_inference_steps, 2.0))
    }
    chunk = max(1, min(50, len(losses) // 4))
    info = {
        "what": "offline glyph dreamer: conditional pixel-space DDPM on font glyphs (no digits)",
        "recipe_version": RECIPE_VERSION,
        "data": {
            "source": "glyphs rendered with FreeType from fonts shipped with matplotlib",
            "fonts": list(gc.fonts),
            "glyphs": "".join(bank.class_names),
            "num_concepts": K,
            "num_base_glyphs": len(bank),
            "augmentation": {
                k: v for k, v in dataclasses.asdict(gc).items() if k not in ("chars", "fonts")
            },
        },
        "pretrain_config": dataclasses.asdict(pc),
        "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in unet_kwargs.items()},
        "scheduler": "DDPM training / DDIM sampling, " + ddim.config.beta_schedule,
        "loss_first": sum(losses[:chunk]) / chunk,
        "loss_final": sum(losses[-chunk:]) / chunk,
        "loss_curve": [
            sum(losses[i : i + chunk]) / len(losses[i : i + chunk])
            for i in range(0, len(losses), chunk)
        ],
        "loss_curve_every": chunk,
        "reference_accuracy_on_glyphs": ref_acc_real,
        "reference_accuracy_on_samples": sample_acc,
        "chance": 1.0 / K,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    dreamer.save_pretrained(out_dir, training_info=info)
    _save_sample_grid(dreamer, out_dir / "samples.png", seed=pc.seed)
    (out_dir / "TRAINED_ON.md").write_text(_trained_on_md(info))
    return dreamer


def _save_sample_grid(dreamer: Dreamer, path: Path, *, seed: int, n_concepts: int = 32) -> None:
    """PNG: one column per concept (first ``n_concepts``), four samples each."""
    import torchvision.utils as vutils

    K = dreamer.concept_embeddings().shape[0]
    ids = torch.arange(min(K, n_concepts)).repeat(4)
    x = dreamer.generate(len(ids), ids, generator=torch.Generator().manual_seed(seed))
    grid = vutils.make_grid(x.cpu(), nrow=min(K, n_concepts), padding=1, pad_value=0.5)
    grid = F.interpolate(grid[None], scale_factor=4, mode="nearest")[0]
    vutils.save_image(grid, path)


def _trained_on_md(info: dict) -> str:
    acc = ", ".join(f"{k}: {v:.3f}" for k, v in info["reference_accuracy_on_samples"].items())
    return (
        "# Offline glyph dreamer\n\n"
        f"{info['what']}.\n\n"
        f"- Data: {info['data']['num_concepts']} glyph concepts "
        f"(`{info['data']['glyphs']}`), {info['data']['num_base_glyphs']} base renderings from "
        f"{len(info['data']['fonts'])} matplotlib fonts ({', '.join(info['data']['fonts'])}).\n"
        f"- Augmentation: {json.dumps(info['data']['augmentation'])}\n"
        f"- Training: {json.dumps(info['pretrain_config'])}\n"
        f"- Loss: {info['loss_first']:.4f} (first steps) -> {info['loss_final']:.4f} (last steps); "
        f"{info['train_seconds']} s on {info['torch_threads']} CPU threads.\n"
        f"- Reference classifier: {info['reference_accuracy_on_glyphs']:.3f} on fresh glyphs; on "
        f"class-conditional dreamer samples {acc} (chance {info['chance']:.3f}).\n"
        "- Samples: `samples.png`.\n"
    )


# ------------------------------------------------------------------------------------------------
# settings, keys, manifests


def resolve_pretrain_config(
    *,
    image_size: int = 16,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    lr: float | None = None,
    config: PretrainConfig | None = None,
    glyph_config: GlyphConfig | None = None,
    channels: int = 1,
) -> tuple[PretrainConfig, GlyphConfig]:
    """The full, checked settings a pretraining with these arguments uses.

    ``(PretrainConfig, GlyphConfig)``; together they determine the weights (see
    :func:`dreamer_key`). A short run (``steps`` below the default, no ``config``) also shortens
    the reference classifier's training and the sample check, which would otherwise dominate it.

    Raises:
        ValueError: an invalid setting (one sentence saying which and what is allowed).
    """
    pc = dataclasses.replace(config or PretrainConfig(), image_size=int(image_size), seed=int(seed))
    if steps is not None:
        pc.steps = int(steps)
        if config is None and pc.steps < PretrainConfig.steps:
            pc.reference_steps = min(pc.reference_steps, max(30, 2 * pc.steps))
            pc.eval_per_class = 1
    if batch_size is not None:
        pc.batch_size = int(batch_size)
    if lr is not None:
        pc.lr = float(lr)
    if pc.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"prediction_type must be 'epsilon' or 'v_prediction', got {pc.prediction_type!r}"
        )
    if pc.steps < 1:
        raise ValueError(f"steps must be >= 1, got {pc.steps}")
    if pc.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {pc.batch_size}")
    if not pc.lr > 0:
        raise ValueError(f"lr must be > 0, got {pc.lr}")
    if pc.seed < 0:
        raise ValueError(f"seed must be >= 0, got {pc.seed}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    levels = len(pc.block_out_channels)
    step = 2 ** (levels - 1)
    if pc.image_size < 8 or pc.image_size % step:
        raise ValueError(
            f"image_size must be >= 8 and a multiple of {step} (the UNet halves it "
            f"{levels - 1} times), got {pc.image_size}; other learner sizes are served by "
            "mapping a dreamer's output (load_or_pretrain_offline_dreamer(output_size=...))"
        )
    gc = dataclasses.replace(
        glyph_config or GlyphConfig(), image_size=pc.image_size, color=channels == 3
    )
    if len(gc.chars) < 2:
        raise ValueError(f"the glyph set needs at least 2 characters, got {gc.chars!r}")
    return pc, gc


def _fingerprint(pc: PretrainConfig, gc: GlyphConfig) -> dict[str, Any]:
    return {"recipe_version": RECIPE_VERSION, "pretrain": pc.to_dict(), "glyphs": gc.to_dict()}


def dreamer_key(pc: PretrainConfig, gc: GlyphConfig) -> str:
    """Folder name of a dreamer: readable prefix + 12 hex of the hash of every setting.

    The prefix names the main settings (recipe version, colour, size, steps, batch size, seed);
    the hash covers all of :class:`PretrainConfig` (learning rate, widths, EMA, reference
    classifier...) and :class:`GlyphConfig` (glyph set, jitter), so settings that change the
    weights never share a folder.
    """
    colour = "_rgb" if gc.color else ""
    h = _sha256_json(_fingerprint(pc, gc))[:12]
    return (
        f"glyph_dreamer_v{RECIPE_VERSION}{colour}_s{pc.image_size}_n{pc.steps}"
        f"_b{pc.batch_size}_seed{pc.seed}_{h}"
    )


def pretrain_command(pc: PretrainConfig, gc: GlyphConfig, out: str | None = None) -> str | None:
    """The ``avalanche-d2l pretrain-dreamer`` command that reproduces these settings.

    ``None`` when a setting has no command-line flag (made through the Python API).
    """
    flags = {"image_size", "steps", "batch_size", "lr", "seed"}
    base = resolve_pretrain_config(
        image_size=pc.image_size,
        steps=pc.steps,
        batch_size=pc.batch_size,
        seed=pc.seed,
        lr=pc.lr,
        channels=3 if gc.color else 1,
    )
    same_pc = {k: v for k, v in pc.to_dict().items() if k not in flags} == {
        k: v for k, v in base[0].to_dict().items() if k not in flags
    }
    same_gc = {k: v for k, v in gc.to_dict().items() if k != "chars"} == {
        k: v for k, v in base[1].to_dict().items() if k != "chars"
    }
    if not (same_pc and same_gc):
        return None
    parts = ["avalanche-d2l", "pretrain-dreamer"]
    if out is not None:
        parts += ["--out", out]
    parts += [
        "--image-size",
        str(pc.image_size),
        "--channels",
        "3" if gc.color else "1",
        "--steps",
        str(pc.steps),
        "--batch-size",
        str(pc.batch_size),
        "--lr",
        repr(pc.lr),
        "--seed",
        str(pc.seed),
    ]
    if gc.chars != DEFAULT_GLYPHS:
        parts += ["--glyphs", "'" + gc.chars.replace("'", "'\\''") + "'"]
    return " ".join(parts + ["--threads", "1"])


def _versions() -> dict[str, str]:
    import diffusers
    import matplotlib

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "matplotlib": matplotlib.__version__,
    }


def weights_digest(dreamer: Dreamer) -> str:
    """sha256 of the dreamer's weights as float32 values (UNet, concepts, reference network).

    Independent of the file format, so a reproduction can be compared with a saved dreamer.
    """
    tensors: dict[str, torch.Tensor] = {
        f"unet.{k}": v for k, v in dreamer.unet.state_dict().items()
    }
    for name in ("concept_table", "null_prompt"):
        t = getattr(dreamer, name)
        if t is not None:
            tensors[name] = t
    ref = dreamer.reference_network()
    if ref is not None:
        tensors.update({f"reference.{k}": v for k, v in ref.net.state_dict().items()})
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.is_floating_point():
            t = t.float()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _write_manifest(folder: Path, pc: PretrainConfig, gc: GlyphConfig, digest: str) -> dict:
    """Write ``manifest.json`` (last: its presence marks a complete folder)."""
    files = {
        p.relative_to(folder).as_posix(): _sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    missing = [f for f in WEIGHT_FILES if f not in files]
    if missing:
        raise RuntimeError(f"{folder}: the saved dreamer lacks {missing}; nothing was written")
    manifest = {
        "format": 1,
        "key": dreamer_key(pc, gc),
        "fingerprint": _fingerprint(pc, gc),
        "command": pretrain_command(pc, gc),
        "weights_sha256": _sha256_json({f: files[f] for f in WEIGHT_FILES}),
        "weights_digest": digest,
        "files": files,
        "versions": _versions(),
    }
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / MANIFEST_NAME)
    return manifest


class DreamerFolderError(RuntimeError):
    """A dreamer folder is incomplete, corrupt or does not load (``path`` says which)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def verify_dreamer_dir(folder: str | os.PathLike) -> dict | None:
    """Check a dreamer folder against its ``manifest.json``; the manifest, or ``None`` without one.

    Raises:
        DreamerFolderError: no ``dreamer_config.json``, an unreadable manifest, or a file
            missing or with another sha256 than recorded.
    """
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise DreamerFolderError(folder, f"no {CONFIG_NAME} (not a complete dreamer folder)")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DreamerFolderError(folder, f"unreadable {MANIFEST_NAME} ({err})") from err
    for rel, expected in files.items():
        p = folder / rel
        if not p.is_file():
            raise DreamerFolderError(folder, f"{rel} is missing")
        if _sha256_file(p) != expected:
            raise DreamerFolderError(folder, f"{rel} does not match its recorded sha256")
    return manifest


# ------------------------------------------------------------------------------------------------
# atomic folders


def _make_temp_sibling(target: Path) -> Path:
    """A fresh temporary folder beside ``target`` (same file system: the rename is atomic)."""
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file; pass a folder path for the dreamer")
    if target.is_dir() and any(target.iterdir()) and not (target / CONFIG_NAME).is_file():
        raise ValueError(
            f"{target} is a non-empty folder that does not hold a saved dreamer; pass a new or "
            "empty folder (a dreamer folder is replaced as a whole)"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_temps(target)
        return Path(tempfile.mkdtemp(prefix=_temp_prefix(target, "tmp"), dir=target.parent))
    except OSError as err:
        raise OSError(
            f"cannot write beside {target} ({err.strerror or err}); pass a folder in a "
            "writable location"
        ) from err


def _temp_prefix(target: Path, kind: str) -> str:
    """``.<name>.<kind>-<host>-<pid>-``: hidden, and says which process owns it."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())
    return f".{target.name}.{kind}-{host}-{os.getpid()}-"


def _remove_dead_temps(target: Path) -> None:
    """Remove temporary siblings of ``target`` left by killed processes of this host (a
    SIGKILL skips the clean-up); those of running processes and other hosts are kept."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())
    for kind in ("tmp", "old"):
        for p in target.parent.glob(f".{target.name}.{kind}-{host}-*-*"):
            pid = p.name[len(f".{target.name}.{kind}-{host}-") :].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` to ``target``, replacing an existing folder as a whole."""
    try:
        os.rename(tmp, target)  # target absent (or an empty folder): one atomic step
        return
    except OSError:
        if not target.is_dir():
            raise
    old = target.with_name(_temp_prefix(target, "old") + uuid.uuid4().hex[:8])
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _move_aside(folder: Path) -> Path:
    aside = folder.with_name(f"{folder.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
    if aside.exists():
        aside = aside.with_name(f"{aside.name}-{uuid.uuid4().hex[:6]}")
    os.rename(folder, aside)
    return aside


# ------------------------------------------------------------------------------------------------
# shipped dreamers, cache, loading


def shipped_dreamers() -> dict[str, Path]:
    """``{key: folder}`` of the dreamers shipped with the package (see :func:`dreamer_key`)."""
    out = {}
    if SHIPPED_ROOT.is_dir():
        for manifest in sorted(SHIPPED_ROOT.glob(f"*/{MANIFEST_NAME}")):
            try:
                out[json.loads(manifest.read_text())["key"]] = manifest.parent
            except (OSError, ValueError, KeyError, TypeError):
                continue  # reported by verify_dreamer_dir when that folder is requested
    return out


_DEVICE_WORDS = (
    "cuda",
    "cudnn",
    "cublas",
    "nccl",
    "hip error",
    "device-side",
    "out of memory",
    "mps backend",
    "xpu",
)


def is_device_error(err: BaseException) -> bool:
    """Whether ``err`` comes from the accelerator (CUDA/ROCm/MPS: out of memory, a busy or
    failed device, a driver error), not from the files being loaded."""
    kinds = tuple(
        k
        for k in (
            getattr(torch.cuda, "OutOfMemoryError", None),
            getattr(torch, "AcceleratorError", None),
        )
        if k
    )
    if kinds and isinstance(err, kinds):
        return True
    return isinstance(err, RuntimeError) and any(w in str(err).lower() for w in _DEVICE_WORDS)


def _load_folder(
    folder: Path, *, device: str | torch.device | None, overrides: dict[str, Any]
) -> Dreamer:
    """Verify and load a folder (on the CPU its float weights are float32)."""
    verify_dreamer_dir(folder)
    dev = resolve_device(device)
    try:
        dreamer = Dreamer.from_pretrained(folder, device=dev, **overrides)
    except Exception as err:  # a loader error means: this folder cannot be used ...
        if is_device_error(err):  # ... unless the device failed: the folder is not to blame
            raise
        raise DreamerFolderError(folder, f"does not load ({type(err).__name__}: {err})") from err
    if dev.type == "cpu" and dreamer.dtype != torch.float32:
        dreamer = dreamer.to(torch.float32)
    return dreamer


def offline_dreamer_available(
    cache_dir: str | os.PathLike | None = None,
    *,
    image_size: int = NATIVE_SIZE,
    channels: int = 1,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    lr: float | None = None,
    config: PretrainConfig | None = None,
    glyph_config: GlyphConfig | None = None,
) -> str | None:
    """Where :func:`load_or_pretrain_offline_dreamer` would get this dreamer without pretraining.

    ``"shipped"``, ``"cache"`` or ``None`` (it would be pretrained first). The arguments are the
    native settings, as for :func:`load_or_pretrain_offline_dreamer`; files are hash-checked on
    load, not here.
    """
    pc, gc = resolve_pretrain_config(
        image_size=image_size,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        lr=lr,
        config=config,
        glyph_config=glyph_config,
        channels=channels,
    )
    key = dreamer_key(pc, gc)
    if key in shipped_dreamers():
        return "shipped"
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return "cache" if (root / key / CONFIG_NAME).is_file() else None


def load_or_pretrain_offline_dreamer(
    cache_dir: str | os.PathLike | None = None,
    *,
    image_size: int = NATIVE_SIZE,
    channels: int = 1,
    output_size: int | None = None,
    output_channels: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    lr: float | None = None,
    config: PretrainConfig | None = None,
    glyph_config: GlyphConfig | None = None,
    progress: bool = True,
    device: str | torch.device | None = "cpu",
) -> Dreamer:
    """The offline glyph dreamer: shipped, cached, or pretrained into the cache first.

    Two kinds of arguments:

    * **native** settings choose the model -- ``image_size`` (the side it is trained and
      generates at), ``channels`` (1: grey glyph world, 3: coloured glyphs), ``steps``,
      ``seed``, ``batch_size``, ``lr``, ``config``, ``glyph_config``;
    * **output** settings map its images to a learner -- ``output_size`` / ``output_channels``
      (bilinear resize, grey repeated to RGB or RGB to luminance); they never need pretraining.

    So a 28 px grey or a 32 px RGB learner keeps the defaults (the shipped 16 px grey dreamer)
    and passes ``output_size=28`` / ``output_size=32, output_channels=3``; only another
    *native* setting (e.g. ``image_size=28``, ``channels=3``) pretrains a new dreamer (about
    14 minutes on one CPU core at the default 600 steps). The model comes from, in order:

    1. the package's shipped dreamer when the native settings match it exactly;
    2. the cache ``cache_dir/<dreamer_key>``;
    3. a pretraining into that cache folder (atomic: temporary folder, then rename).

    A cached folder that fails its hashes or does not load is reported (warning naming its path),
    moved aside as ``<folder>.broken-<time>`` and pretrained again. The returned dreamer has an
    ``offline_source`` dict: ``source`` (``"shipped"``, ``"cache"`` or ``"pretrained"``),
    ``path``, ``key``, ``native_shape`` and ``output_shape``.

    Args:
        cache_dir: parent folder of the cache (default :func:`default_cache_dir`).
        image_size: native side (default :data:`NATIVE_SIZE`, the shipped dreamer's).
        channels: native glyph world: 1 (grey, shipped) or 3 (coloured glyphs).
        output_size: side of the images the learner takes (``None``: native).
        output_channels: channels the learner takes, 1 or 3 (``None``: native).
        steps: training steps (default ``PretrainConfig.steps``).
        seed: training seed.
        batch_size: training batch size (default ``PretrainConfig.batch_size``).
        lr: peak learning rate (default ``PretrainConfig.lr``).
        config: full pretraining settings (see :func:`resolve_pretrain_config`).
        glyph_config: the glyph world's settings.
        progress: tqdm bars while pretraining.
        device: where to load it (``None``: CUDA when available).
    """
    if output_size is not None and int(output_size) < 1:
        raise ValueError(f"output_size must be >= 1, got {output_size}")
    if output_channels not in (None, 1, 3):
        raise ValueError(f"output_channels must be 1 or 3 (grey or RGB), got {output_channels}")
    pc, gc = resolve_pretrain_config(
        image_size=image_size,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        lr=lr,
        config=config,
        glyph_config=glyph_config,
        channels=channels,
    )
    key = dreamer_key(pc, gc)
    overrides: dict[str, Any] = {}
    if output_size is not None and int(output_size) != pc.image_size:
        overrides["output_size"] = int(output_size)
    if output_channels is not None and output_channels != channels:
        overrides["output_channels"] = output_channels

    dreamer, source, folder = None, None, None
    shipped = shipped_dreamers().get(key)
    if shipped is not None:
        try:
            dreamer = _load_folder(shipped, device=device, overrides=overrides)
            source, folder = "shipped", shipped
        except DreamerFolderError as err:
            warnings.warn(
                f"the shipped offline dreamer is damaged ({err}); reinstall avalanche-d2l. "
                "Using the cache instead (pretraining it there if missing).",
                stacklevel=2,
            )
    if dreamer is None:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        folder = root / key
        if folder.exists():
            try:
                dreamer, source = _load_folder(folder, device=device, overrides=overrides), "cache"
            except DreamerFolderError as err:
                aside = _move_aside(folder)
                warnings.warn(
                    f"the cached offline dreamer {folder} cannot be used ({err.reason}); moved it "
                    f"to {aside} and pretraining it again",
                    stacklevel=2,
                )
        if dreamer is None:
            if progress:
                print(
                    f"pretraining the offline glyph dreamer into {folder} (once; "
                    f"{pc.steps} steps, about {max(1, round(pc.steps * 1.4 / 60))} min on one "
                    "CPU core at the default size)",
                    file=sys.stderr,
                )
            pretrain_offline_dreamer(
                folder,
                image_size=pc.image_size,
                steps=pc.steps,
                batch_size=pc.batch_size,
                seed=pc.seed,
                lr=pc.lr,
                config=pc,
                glyph_config=gc,
                channels=channels,
                progress=progress,
            )
            dreamer = _load_folder(folder, device=device, overrides=overrides)
            source = "pretrained"
    dreamer.offline_source = {
        "source": source,
        "path": str(folder),
        "key": key,
        "native_shape": (channels, pc.image_size, pc.image_size),
        "output_shape": tuple(dreamer.output_shape),
    }
    logger.info(
        "offline dreamer: %s %s (%s), native %s mapped to %s",
        source,
        key,
        folder,
        dreamer.offline_source["native_shape"],
        dreamer.offline_source["output_shape"],
    )
    return dreamer


def _cache_name(image_size: int, steps: int, seed: int, channels: int = 1) -> str:
    """Folder name of the default-settings dreamer of this native size/steps/seed/channels
    (kept for callers of the old API; prefer :func:`dreamer_key`)."""
    return dreamer_key(
        *resolve_pretrain_config(image_size=image_size, steps=steps, seed=seed, channels=channels)
    )


# ------------------------------------------------------------------------------------------------
# command line


def _int_at_least(low: int):
    """argparse type: a whole number >= ``low``, or one sentence saying what is wrong."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def _parser() -> argparse.ArgumentParser:
    d = PretrainConfig()
    p = argparse.ArgumentParser(
        prog="avalanche-d2l pretrain-dreamer",
        description="Pretrain the offline glyph dreamer (conditional pixel diffusion on font "
        "glyphs, no digits) and its reference classifier on CPU. The package ships the default "
        "16 px grey dreamer; this command reproduces it or makes others.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder, new or a dreamer folder (replaced as a whole); default: the cache "
        f"the strategies read, {default_cache_dir()}/<settings key>",
    )
    p.add_argument(
        "--image-size",
        type=_positive_int,
        default=NATIVE_SIZE,
        help=f"native image side (>= 8, a multiple of 4; default {NATIVE_SIZE})",
    )
    p.add_argument(
        "--channels",
        type=int,
        default=1,
        choices=(1, 3),
        help="1: grey glyphs (default); 3: coloured glyphs",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=d.steps,
        help=f"denoiser training steps (default {d.steps})",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=d.batch_size,
        help=f"glyph images per step (default {d.batch_size})",
    )
    p.add_argument(
        "--lr", type=_positive_float, default=d.lr, help=f"peak learning rate (default {d.lr})"
    )
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument(
        "--glyphs",
        default=None,
        help="the glyph set, one concept per character (no digits; default: Latin, "
        "Greek and symbols)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is fastest on a busy "
        "2-core machine and is what the shipped dreamer used)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``avalanche-d2l pretrain-dreamer``: pretrain the glyph dreamer into a folder."""
    p = _parser()
    args = p.parse_args(argv)
    try:
        glyph_config = GlyphConfig(chars=args.glyphs) if args.glyphs is not None else None
        pc, gc = resolve_pretrain_config(
            image_size=args.image_size,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            lr=args.lr,
            glyph_config=glyph_config,
            channels=args.channels,
        )
    except ValueError as err:
        p.error(str(err))
    key = dreamer_key(pc, gc)
    out = args.out if args.out is not None else default_cache_dir() / key
    if args.threads:
        torch.set_num_threads(args.threads)
    shipped = shipped_dreamers().get(key)
    if shipped is not None:
        print(
            f"these are the settings of the shipped dreamer ({shipped}); the strategies use "
            "that copy, this run reproduces it",
            file=sys.stderr,
        )
    try:
        dreamer = pretrain_offline_dreamer(
            out,
            image_size=pc.image_size,
            steps=pc.steps,
            batch_size=pc.batch_size,
            seed=pc.seed,
            lr=pc.lr,
            glyph_config=glyph_config,
            progress=not args.no_progress,
            channels=args.channels,
        )
    except (ValueError, OSError) as err:
        print(f"avalanche-d2l pretrain-dreamer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: {out} was left as it was", file=sys.stderr)
        return 130
    info = dreamer.training_info
    digest = weights_digest(dreamer)
    print(f"saved to {out}")
    print(f"loss {info['loss_first']:.4f} -> {info['loss_final']:.4f} in {info['train_seconds']} s")
    print(
        "reference accuracy on dreamer samples:",
        json.dumps(info["reference_accuracy_on_samples"]),
        f"(chance {info['chance']:.3f})",
    )
    print(f"weights digest {digest}")
    if shipped is not None:
        ref = json.loads((shipped / MANIFEST_NAME).read_text()).get("weights_digest")
        same = "identical to" if ref == digest else "different from"
        print(f"{same} the shipped dreamer's weights ({ref})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
