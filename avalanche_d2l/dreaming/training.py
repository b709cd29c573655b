"""Pretraining recipe of the offline glyph dreamer: its settings, the training loop of the
denoiser, concept table and reference classifier, and the evaluation of a trained dreamer."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..core.config import ConfigBase
from ..core.seeding import seed_everything
from .config import DreamerConfig
from .dreamer import Dreamer
from .glyphs import GlyphBank, GlyphConfig
from .loading import _default_scheduler_config, default_unet_config
from .reference import make_reference

logger = logging.getLogger(__name__)

#: bump when the training recipe changes, so stale caches are not reused
RECIPE_VERSION = 1


@dataclass
class PretrainConfig(ConfigBase):
    """Settings of the offline glyph dreamer's pretraining (saved in ``training_info.json``).

    Attributes:
        image_size: image side (16 matches ``split_digits``' default).
        steps: DDPM training steps of the denoiser.
        batch_size: glyph images per step.
        lr: peak AdamW learning rate (linear warm-up, cosine decay to 10%).
        seed: seeds glyph sampling and initialisation (``seed_everything``).
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

    # values kept as given; the fingerprint names the saved dreamer (sha256 of compact JSON)
    checks_types = False
    fingerprint_hash = "sha256"
    fingerprint_chars = None
    fingerprint_compact = True


#: native side of the shipped offline dreamer; learners of other sizes get its images resized


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


def _train(out_dir: Path, pc: PretrainConfig, gc: GlyphConfig, progress: bool) -> Dreamer:
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from tqdm.auto import tqdm

    t_start = time.time()
    seed_everything(pc.seed)
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
