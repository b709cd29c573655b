"""Preflight: measure one pass of each kind of work at the configured sizes, before training.

A D2L run dreams only after experience 0 has trained (hours on a GPU), so a dreaming phase that
does not fit used to fail late. :func:`preflight` runs, at the run's sizes and on its devices:

1. one differentiable dreaming pass: one micro-batch of dream classes through the DDIM loop with
   its truncated backprop, the learner's forward, the dream loss and ``backward`` into the prompts
   (the unit a prompt step is made of);
2. generation of one batch of the dream set (no graph);
3. one training step of the learner (forward, backward, SGD step) on a real + dream minibatch;

and measures the time and the peak memory of each (CUDA ``max_memory_allocated`` per device, or
the process's peak RSS on CPU). It then extrapolates to a dreaming phase (every class for the
full step cap, the upper bound: the oracle may stop classes earlier) and to a run. On CUDA it
raises :class:`PreflightError`, naming the settings to change, when a pass does not fit in the
device's memory.

The measuring lives in :mod:`.measure`; :func:`estimate_paper_cost` (:mod:`.paper_cost`) turns
FLOP counts and activation sizes into GPU memory and GPU-hours per run for a given GPU (both
re-exported here).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import accel
from .measure import GiB, Measure, count_flops, peak_memory, saved_activation_bytes
from .paper_cost import GpuSpec, estimate_paper_cost

if TYPE_CHECKING:  # the settings of the method layer above; read by attribute only
    from ..d2l.config import DreamConfig

__all__ = [
    "GiB",
    "GpuSpec",
    "Measure",
    "PreflightError",
    "PreflightReport",
    "count_flops",
    "dreaming_plan",
    "estimate_paper_cost",
    "peak_memory",
    "preflight",
    "saved_activation_bytes",
]


class PreflightError(RuntimeError):
    """A pass of the run does not fit in the device's memory (the message says what to change)."""


# ------------------------------------------------------------------------------------------------
# the preflight


def dreaming_plan(
    *, n_classes: int, n_experiences: int, dream_config: DreamConfig, n_extra_heads: int = 0
) -> tuple[int, int]:
    """``(dream classes of the largest phase, dreaming phases of a run)`` of a class-incremental
    stream of ``n_classes`` in ``n_experiences`` equal experiences: D2L dreams on the free heads
    (capped by ``max_dream_classes``) after every experience but the last (unless
    ``dream_after_last``); the first phase has the most free heads."""
    per_exp = max(1, n_classes // max(1, n_experiences))
    free = n_classes + n_extra_heads - per_exp
    k = (
        free
        if dream_config.max_dream_classes is None
        else min(free, dream_config.max_dream_classes)
    )
    phases = n_experiences - 1 + int(bool(dream_config.dream_after_last and n_extra_heads > 0))
    return max(0, k), max(0, phases)


@dataclass
class PreflightReport:
    """What :func:`preflight` measured and extrapolated.

    Attributes:
        settings: the sizes and settings measured (devices, precision, shapes, micro-batch...).
        prompt_pass: one differentiable dreaming pass of ``micro_batch`` images.
        generate_batch: generation of ``generate_batch_size`` dream images (no graph).
        train_step: one learner training step.
        phase: per dreaming phase: number of passes/batches, seconds (upper bound), peak GiB.
        run: per run: seconds for all dreaming phases (+ training when its step count was given).
        fits: ``{device: True/False/None}`` (None: not a CUDA device, nothing to compare with).
    """

    settings: dict[str, Any]
    prompt_pass: Measure
    generate_batch: Measure
    train_step: Measure
    phase: dict[str, Any]
    run: dict[str, Any]
    fits: dict[str, bool | None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "prompt_pass": self.prompt_pass.to_dict(),
            "generate_batch": self.generate_batch.to_dict(),
            "train_step": self.train_step.to_dict(),
            "phase": self.phase,
            "run": self.run,
            "fits": self.fits,
        }

    def to_text(self) -> str:
        s, ph, run = self.settings, self.phase, self.run

        def peaks(m: Measure) -> str:
            return ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in m.peak_bytes.items()) or "-"

        lines = [
            f"preflight on {s['device']} (dreamer on {s['dreamer_device']}, precision "
            f"{s['precision']}), learner images {tuple(s['image_shape'])}, dreamer latents "
            f"{s['latent_size']}x{s['latent_size']}",
            f"  prompt pass ({s['micro_batch']} images, {s['num_inference_steps']} DDIM steps, "
            f"{s['backprop_steps']} with graph): {self.prompt_pass.seconds:.2f} s, peak "
            f"{peaks(self.prompt_pass)}",
            f"  generation batch ({s['generate_batch_size']} images, "
            f"{s['generate_inference_steps']} steps): {self.generate_batch.seconds:.2f} s, peak "
            f"{peaks(self.generate_batch)}",
            f"  training step ({s['train_batch']} images): {self.train_step.seconds:.3f} s, peak "
            f"{peaks(self.train_step)}",
            f"  per dreaming phase ({s['n_dream_classes']} dream classes, <= {s['steps']} prompt "
            f"steps): {ph['prompt_passes']} prompt passes + {ph['generate_batches']} generation "
            f"batches + {ph['sleep_steps']} sleep steps <= {ph['seconds'] / 3600:.2f} h, peak "
            f"{ph['peak_gib']:.2f} GiB, dream set {ph['dream_set_gib']:.2f} GiB (host)",
            f"  per run ({s['n_dreaming_phases']} dreaming phases): dreaming <= "
            f"{run['dreaming_seconds'] / 3600:.2f} h"
            + (
                f", training {run['training_seconds'] / 3600:.2f} h, total <= "
                f"{run['seconds'] / 3600:.2f} h"
                if run.get("training_seconds") is not None
                else " (training not estimated: pass train_steps)"
            ),
        ]
        for dev, ok in self.fits.items():
            if ok is not None:
                lines.append(f"  fits on {dev}: {'yes' if ok else 'NO'}")
        return "\n".join(lines)


class _PlainHeads(nn.Module):
    """A plain classifier as a head classifier for the preflight (features = logits)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward_heads(self, x: Tensor, *, return_features: bool = False):
        out = self.net(x)
        return (out, out) if return_features else out


def _advice(cfg: DreamConfig, dreamer, micro: int) -> str:
    dc = dreamer.config
    tips = [
        f"DreamConfig.micro_batch (now {cfg.micro_batch}; {micro} images per pass, at least "
        f"batch_per_class={cfg.batch_per_class})",
        f"DreamConfig.generate_batch_size (now {cfg.generate_batch_size})",
    ]
    if not dc.gradient_checkpointing:
        tips.append("dreamer gradient_checkpointing=True")
    tips.append(f"dreamer backprop_steps (now {dc.backprop_steps}; 1 keeps one step's graph)")
    if accel.resolve_precision(dc.mixed_precision, dreamer.device) == "no":
        tips.append("dreamer mixed_precision='bf16'")
    if dc.kind == "latent":
        tips.append(f"the dreamer's latent_size (now {dc.latent_size})")
    tips.append("dreamer_device (put the dreamer on a second GPU)")
    return "lower or set: " + "; ".join(tips)


def preflight(
    *,
    dreamer,
    classifier: nn.Module,
    dream_config: DreamConfig,
    image_shape: tuple[int, int, int],
    n_dream_classes: int,
    n_dreaming_phases: int,
    train_batch: int,
    device: str | torch.device | None = None,
    n_classes: int | None = None,
    train_steps: int | None = None,
    generate_inference_steps: int | None = None,
    memory_fraction: float = 0.92,
    device_memory: dict[str, int] | None = None,
    raise_on_overflow: bool = True,
) -> PreflightReport:
    """Measure one pass of dreaming, one generation batch and one training step; extrapolate.

    Args:
        dreamer: the run's :class:`~avalanche_d2l.dreaming.Dreamer`, on its device.
        classifier: the learner: a head classifier (``forward_heads``) or a plain ``nn.Module``
            returning logits. Its parameters are restored afterwards (the training step is run
            on a copy of the optimiser state only: a plain SGD step, then the weights are put
            back).
        dream_config: the run's :class:`DreamConfig`.
        image_shape: ``(C, H, W)`` of the learner's images.
        n_dream_classes: dream classes of a dreaming phase (the largest phase).
        n_dreaming_phases: dreaming phases of a run.
        train_batch: learner minibatch size (real images; as many dreams are added).
        device: the learner's device (``None``: the classifier's).
        n_classes: logits of the learner (``None``: probed with one forward).
        train_steps: training steps of a whole run (epochs x iterations x experiences), to
            estimate its training time; ``None`` leaves it out.
        generate_inference_steps: DDIM steps of the measured generation batch (``None``: the
            configured ones); fewer steps are extrapolated linearly to the configured number.
        memory_fraction: share of a device's memory a pass may use.
        device_memory: ``{device: bytes}`` to check against instead of the CUDA devices' own
            memory, e.g. ``{"cuda:0": 80 * 2**30}`` (will it fit on an 80 GB GPU) or
            ``{"cpu_rss": bytes}`` (a RAM budget for the process's peak RSS).
        raise_on_overflow: raise :class:`PreflightError` when a pass does not fit.

    Returns:
        a :class:`PreflightReport` (``to_text()`` for people, ``to_dict()`` for results).
    """
    cfg = dream_config
    dev = torch.device(device) if device is not None else next(classifier.parameters()).device
    ddev = dreamer.device
    devices = [dev, ddev]
    heads_model = classifier if hasattr(classifier, "forward_heads") else _PlainHeads(classifier)
    b = cfg.batch_per_class
    per_pass = max(1, int(cfg.micro_batch) // b) if cfg.micro_batch else max(1, n_dream_classes)
    per_pass = min(per_pass, max(1, n_dream_classes))
    micro = per_pass * b
    dc = dreamer.config
    opt_steps = int(cfg.num_inference_steps or dc.num_inference_steps)
    k = cfg.backprop_steps if cfg.backprop_steps is not None else dc.backprop_steps
    k = opt_steps if k is None else min(int(k), opt_steps)
    gen_steps_cfg = int(cfg.generate_inference_steps or dc.num_inference_steps)
    gen_steps = int(generate_inference_steps or gen_steps_cfg)
    g = torch.Generator().manual_seed(0)
    was_training = classifier.training
    classifier.eval()
    with torch.no_grad():
        probe = heads_model.forward_heads(torch.zeros(1, *image_shape, device=dev))
    n_out = int(n_classes or probe.shape[1])
    n_seen = max(0, n_out - per_pass)

    # 1. one differentiable dreaming pass of one micro-batch, backward into the prompts
    prompts = dreamer.random_prompt(per_pass, generator=g).to(ddev).requires_grad_(True)
    flags = [p.requires_grad for p in classifier.parameters()]
    classifier.requires_grad_(False)
    try:
        with peak_memory(devices) as m_pass:
            emb = prompts.repeat_interleave(b, dim=0)
            images = dreamer.sample(
                emb,
                generator=g,
                num_inference_steps=cfg.num_inference_steps,
                backprop_steps=cfg.backprop_steps,
            ).float()
            logits, feats = heads_model.forward_heads(images.to(dev), return_features=True)
            logits = logits.float()
            targets = (n_seen + torch.arange(per_pass, device=dev)).clamp_max(n_out - 1)
            loss = (
                F.cross_entropy(logits, targets.repeat_interleave(b))
                + 1e-3 * feats.float().pow(2).mean()
            )
            loss.backward()
            del images, logits, feats, loss
    finally:
        for p, f in zip(classifier.parameters(), flags):
            p.requires_grad_(f)
    if prompts.grad is None or not torch.isfinite(prompts.grad).all():
        raise PreflightError(
            "the dreaming pass gave no finite gradient to the prompts; check the dreamer's "
            "mixed_precision (fp16 needs loss scaling: use bf16) and backprop_steps"
        )

    # 2. one generation batch (no graph)
    n_gen = int(cfg.generate_batch_size)
    cond = dreamer.random_prompt(1, generator=g)[0].to(ddev).expand(n_gen, -1, -1)
    with torch.no_grad(), peak_memory(devices) as m_gen:
        dreamer.sample(cond, generator=g, num_inference_steps=gen_steps, grad=False)
    m_gen.seconds *= gen_steps_cfg / gen_steps

    # 3. one training step of the learner on real + dream images (weights restored afterwards)
    state = {k_: v.detach().clone() for k_, v in classifier.state_dict().items()}
    n_dream = int(cfg.dream_batch_size or train_batch)
    x = torch.randn(train_batch + n_dream, *image_shape, generator=g).to(dev)
    y = torch.randint(0, n_out, (x.shape[0],), generator=g).to(dev)
    classifier.train()
    opt = torch.optim.SGD([p for p in classifier.parameters() if p.requires_grad], lr=1e-3)
    try:
        with peak_memory(devices) as m_train:
            out = heads_model.forward_heads(x)
            F.cross_entropy(out.float(), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        classifier.load_state_dict(state)
        classifier.train(was_training)

    # 4. extrapolate: a phase runs every class for the whole step cap (upper bound)
    passes_per_step = math.ceil(max(n_dream_classes, 0) / per_pass)
    prompt_passes = passes_per_step * (cfg.steps + 1)  # the last pass only judges (no graph)
    n_images = n_dream_classes * cfg.samples_per_class
    gen_batches = math.ceil(n_images / n_gen)
    sleep_steps = cfg.sleep_epochs * math.ceil(n_images / n_dream)
    phase_s = (
        prompt_passes * m_pass.seconds + gen_batches * m_gen.seconds + sleep_steps * m_train.seconds
    )
    peak: dict[str, int] = {}
    for m in (m_pass, m_gen, m_train):
        for d, v in m.peak_bytes.items():
            peak[d] = max(peak.get(d, 0), v)
    dream_set = n_images * math.prod(image_shape) * 4
    phase = {
        "prompt_passes": prompt_passes,
        "passes_per_prompt_step": passes_per_step,
        "generate_batches": gen_batches,
        "sleep_steps": sleep_steps,
        "seconds": phase_s,
        "peak_bytes": peak,
        "peak_gib": max(peak.values(), default=0) / GiB,
        "dream_set_gib": dream_set / GiB,
    }
    dreaming_s = n_dreaming_phases * phase_s
    train_s = None if train_steps is None else train_steps * m_train.seconds
    run = {
        "dreaming_seconds": dreaming_s,
        "training_seconds": train_s,
        "seconds": dreaming_s + (train_s or 0.0),
    }
    totals: dict[str, int] = {}
    for d in sorted({str(dev), str(ddev)}):
        if torch.device(d).type == "cuda":
            totals[d] = torch.cuda.get_device_properties(torch.device(d)).total_memory
    totals.update(device_memory or {})
    fits: dict[str, bool | None] = {d: None for d in sorted({str(dev), str(ddev)})}
    for d, total in totals.items():
        fits[d] = peak.get(d, 0) <= memory_fraction * total
    settings = {
        "device": str(dev),
        "dreamer_device": str(ddev),
        "precision": accel.resolve_precision(dc.mixed_precision, ddev),
        "image_shape": list(image_shape),
        "latent_size": dc.latent_size,
        "micro_batch": micro,
        "batch_per_class": b,
        "num_inference_steps": opt_steps,
        "backprop_steps": k,
        "gradient_checkpointing": bool(dc.gradient_checkpointing),
        "generate_batch_size": n_gen,
        "generate_inference_steps": gen_steps_cfg,
        "measured_generate_steps": gen_steps,
        "train_batch": train_batch,
        "dream_batch": n_dream,
        "n_dream_classes": n_dream_classes,
        "n_dreaming_phases": n_dreaming_phases,
        "steps": cfg.steps,
        "samples_per_class": cfg.samples_per_class,
        "sleep_epochs": cfg.sleep_epochs,
        "train_steps": train_steps,
        "torch_threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }
    report = PreflightReport(
        settings=settings,
        prompt_pass=m_pass,
        generate_batch=m_gen,
        train_step=m_train,
        phase=phase,
        run=run,
        fits=fits,
    )
    bad = [d for d, ok in fits.items() if ok is False]
    if bad and raise_on_overflow:
        raise PreflightError(
            f"a dreaming phase does not fit on {', '.join(bad)}: peak "
            f"{max(peak.get(d, 0) for d in bad) / GiB:.2f} GiB > {memory_fraction:.0%} of "
            f"{min(totals[d] for d in bad) / GiB:.2f} GiB; "
            + _advice(cfg, dreamer, micro)
            + ".\n"
            + report.to_text()
        )
    return report
