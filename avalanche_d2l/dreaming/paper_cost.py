"""Paper-scale cost of a D2L run from FLOP counts and activation sizes (:func:`count_flops`,
:func:`saved_activation_bytes` of :mod:`.measure`, e.g. on the meta device at the paper's
sizes): GPU memory and GPU-hours per run for a given :class:`GpuSpec`;
``benchmarks/bench_sd15.py`` uses it for the paper experiments."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .measure import GiB

if TYPE_CHECKING:  # the settings of the method layer above; read by attribute only
    from ..d2l.config import DreamConfig

__all__ = ["GpuSpec", "estimate_paper_cost"]


@dataclass
class GpuSpec:
    """A GPU for :func:`estimate_paper_cost`.

    Attributes:
        name: label.
        memory_gib: device memory.
        peak_tflops: dense bf16/fp16 tensor-core peak.
        utilisation: share of the peak the dreamer's passes reach (model FLOPs utilisation),
            an assumption of the estimate (the README's GPU section states the one it uses).
        learner_utilisation: the same for the learner's training steps (small learners are
            bound by kernel launches and data loading rather than by FLOPs).
    """

    name: str = "A100-80GB"
    memory_gib: float = 80.0
    peak_tflops: float = 312.0
    utilisation: float = 0.35
    learner_utilisation: float = 0.1


def estimate_paper_cost(
    *,
    dream_config: DreamConfig,
    n_dream_classes: int,
    n_dreaming_phases: int,
    prompt_pass_flops: float,
    prompt_pass_images: int,
    generate_flops_per_image: float,
    train_step_flops: float,
    train_steps_per_run: int,
    weight_bytes: float,
    prompt_pass_activation_bytes: float,
    generate_activation_bytes: float,
    train_step_bytes: float = 0.0,
    recompute_bytes: float = 0.0,
    dream_batch: int | None = None,
    gpu: GpuSpec | None = None,
    overhead: float = 1.25,
) -> dict[str, Any]:
    """GPU memory and GPU-hours of a run from FLOP counts and activation sizes.

    Time is ``FLOPs / (peak_tflops x utilisation)`` per part (the learner's steps with
    ``learner_utilisation``); a dreaming phase is counted at its
    upper bound (every class runs the whole step cap; the oracle may stop classes earlier).
    Memory of the largest pass is ``weights + overhead x (activations + recompute)``: what the
    pass saves for backward, plus the largest checkpointed block's activations that backward
    recomputes and holds on top (``overhead`` for the other backward transients, allocator
    fragmentation and the CUDA context), plus the learner's step.

    Args:
        dream_config: the run's :class:`DreamConfig`.
        n_dream_classes: dream classes per phase.
        n_dreaming_phases: dreaming phases per run.
        prompt_pass_flops: FLOPs (forward + backward) of one differentiable pass of
            ``prompt_pass_images`` images (:func:`count_flops`).
        prompt_pass_images: images of that pass (the micro-batch).
        generate_flops_per_image: FLOPs to generate one dream-set image.
        train_step_flops: FLOPs of one learner training step.
        train_steps_per_run: learner training steps of a run (without sleep steps).
        weight_bytes: bytes of the dreamer's (and the learner's) weights on the GPU.
        prompt_pass_activation_bytes: bytes a pass holds for backward
            (:func:`saved_activation_bytes`).
        generate_activation_bytes: peak bytes of one generation batch beyond the weights.
        train_step_bytes: peak bytes of the learner's step beyond its weights.
        recompute_bytes: the largest checkpointed block's saved bytes
            (:func:`~avalanche_d2l.dreaming.measure.largest_block_bytes`; 0 without
            checkpointing).
        dream_batch: dream images per sleep step (``None``: ``dream_config.dream_batch_size``
            or 32).
        gpu: the :class:`GpuSpec` (default A100-80GB).
        overhead: multiplier on activation bytes.

    Returns:
        dict with ``gpu``, ``memory_gib`` (peak), ``fits``, ``phase_gpu_hours``,
        ``run_gpu_hours`` and their parts.
    """
    gpu = gpu or GpuSpec()
    cfg = dream_config
    rate = gpu.peak_tflops * 1e12 * gpu.utilisation
    b = cfg.batch_per_class
    per_pass_images = max(b, prompt_pass_images)
    images_per_step = n_dream_classes * b
    prompt_flops = (cfg.steps + 1) * images_per_step * prompt_pass_flops / per_pass_images
    n_images = n_dream_classes * cfg.samples_per_class
    gen_flops = n_images * generate_flops_per_image
    dream_batch = int(dream_batch or cfg.dream_batch_size or 32)
    sleep_steps = cfg.sleep_epochs * math.ceil(n_images / dream_batch)
    sleep_flops = sleep_steps * train_step_flops
    learner_rate = gpu.peak_tflops * 1e12 * gpu.learner_utilisation
    phase_s = (prompt_flops + gen_flops) / rate + sleep_flops / learner_rate
    train_s = train_steps_per_run * train_step_flops / learner_rate
    act = max(prompt_pass_activation_bytes + recompute_bytes, generate_activation_bytes)
    mem = weight_bytes + overhead * act + train_step_bytes
    return {
        "gpu": dataclasses.asdict(gpu),
        "memory_gib": mem / GiB,
        "fits": mem <= gpu.memory_gib * GiB * 0.92,
        "prompt_pass_activation_gib": prompt_pass_activation_bytes / GiB,
        "generate_activation_gib": generate_activation_bytes / GiB,
        "recompute_gib": recompute_bytes / GiB,
        "weights_gib": weight_bytes / GiB,
        "phase_flops": {"prompts": prompt_flops, "generate": gen_flops, "sleep": sleep_flops},
        "phase_gpu_hours": phase_s / 3600,
        "dreaming_gpu_hours": n_dreaming_phases * phase_s / 3600,
        "training_gpu_hours": train_s / 3600,
        "run_gpu_hours": (n_dreaming_phases * phase_s + train_s) / 3600,
        "assumptions": (
            f"{gpu.name}: {gpu.peak_tflops:g} TFLOP/s peak at {gpu.utilisation:.0%} utilisation "
            f"for the dreamer, {gpu.learner_utilisation:.0%} for the learner; "
            "every dream class runs the full step cap; matmul/conv/attention FLOPs only; "
            f"memory = weights + {overhead:g} x (activations + the largest recomputed "
            "checkpoint block) + learner step"
        ),
    }
