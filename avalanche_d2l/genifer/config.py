"""Genifer's settings: one typed dataclass, its checks, its dict round trip and fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from avalanche_d2l.augment import AugmentConfig

__all__ = ["GeniferConfig"]

_CHOICES = {
    "mixed_precision": ("no", "fp16", "bf16"),
    "head": ("fixed", "fresh_per_task"),
    "teacher_bn": ("eval", "train"),
    "r1_lazy_scaling": ("interval", "reference"),
    "g_family": ("stylegan2", "reference"),
    "d_family": ("compact", "reference"),
    "replay_padding": ("constant", "edge"),
    "fd_distance": ("rms", "norm"),
    "gan_stop": ("fidelity", "fixed"),
}


@dataclass
class GeniferConfig:
    """All settings of Genifer. The defaults are the CPU preset of the 16 px offline streams.

    Generator (``None`` = taken from the data at the first experience):
        resolution: synthesis size, a power of two (``None``: the next power of two of the data's
            side; the output is resized to the data's size when they differ).
        num_classes: size of the label space (``None``: the benchmark's ``n_classes``).
        z_dim, embed_dim, w_dim, mapping_layers, g_channel_base, g_channel_max,
        output_activation: see :class:`GeneratorConfig`.
        output_range: value range of the classifier's input, ``(low, high)`` or per-channel lists
            (``None``: min/max per channel of up to 1024 real images of the first experience).
        g_family: ``"stylegan2"`` (demodulated, 1x1 output) or ``"reference"`` (the authors'
            layers: modulation without demodulation, 3x3 output conv; use with
            ``output_activation="none"`` for their linear output).
    Discriminator:
        d_channels: width of D; mbstd_group: minibatch-stddev group size; d_cmap_dim: size of
            the projection space (``None``: ``d_channels``); d_family: ``"compact"`` or
            ``"reference"``.
    GAN training (after every experience):
        gan_steps_first: G/D steps after the first experience; gan_steps: after later ones
            (with ``gan_stop="fidelity"``: the caps).
        gan_stop: ``"fidelity"``: the phase ends when every class's replay passes
            ``fidelity_threshold`` (train-on-replay-test-on-real accuracy, checked every
            ``fidelity_every`` steps) and the mean gains less than ``fidelity_min_delta`` over
            the best earlier check, not before ``gan_min_steps`` (the floor); a class still
            below the threshold at the cap is named in a warning and in the phase's summary.
            ``"fixed"`` (the reference): exactly ``gan_steps_first`` / ``gan_steps`` steps.
        measure_fidelity: measure the replay's fidelity after every phase (see
            :mod:`avalanche_d2l.genifer.fidelity`): ``fidelity_holdout`` of the experience's
            images are held out of the GAN phase for it; ``fidelity_probe_steps`` trains each
            probe.
        gan_batch_size, g_lr, d_lr, adam_betas: Adam settings for G and D.
        gan_optimizer_reset: new Adam optimisers at every GAN phase (reference) instead of
            keeping their state.
        r1_gamma, r1_interval: lazy R1 penalty on the real *features* every N steps.
        r1_lazy_scaling: ``"interval"``: penalty x gamma/2 x N (StyleGAN2's lazy weighting);
            ``"reference"``: x gamma/2 x N/(N+1), with D's lr x N/(N+1) and betas ** (N/(N+1)).
        ema_kimg: half-life of the EMA generator in thousands of images.
        ema_rampup: StyleGAN2 ramp: the half-life is at most this fraction of all images shown
            so far (``None``: no ramp).
        ema_ramp_phase: when set, the half-life instead grows linearly from 0 over this fraction
            of *every* phase (the reference ramps over about the first half).
        g_distill_weight: self-distillation weight, multiplied by n_old / n_new classes.
        g_distill_std: per-channel std the self-distillation difference is divided by (the
            reference compares in mean/std-normalised space; ``None``: the classifier's input
            space, which is that space when the data is already normalised).
        gan_checkpoint_every: write a resumable checkpoint of a GAN phase every N steps (needs a
            ``checkpoint_dir`` on the plugin); 0 = never.
    Adaptive augmentation (applied in image space to real and fake before the classifier):
        augment, ada_target, ada_p_max, ada_interval, ada_kimg (thousands of images for a full
        0 -> 1 swing of p).
    Classifier update on experiences t >= 1:
        ce_weight, kd_weight, fd_weight, kd_temperature: loss weights (paper: 0.02 / 0.98 / 1.0
            with 100 RAdam epochs and ``fd_distance="norm"``). CPU default: 1 / 3 / 1.0 (rms).
        fd_distance: ``"rms"``: the feature distance per element (L2 norm over the square root
            of the number of feature values), so the same weight holds for a large conv map and
            a pooled vector; ``"norm"``: the reference's unnormalised L2 norm, whose strength
            grows with the layer's size (x128 the "rms" value at its 256x8x8 layer).
        head: ``"fixed"``: losses and prediction over every output unit; ``"fresh_per_task"``
            (reference): the rows of classes new to the model are re-initialised at the start of
            their experience and the logits of classes not seen yet are masked in CE, KD and the
            evaluation argmax (a fixed-size head behaves like a head grown per task; Avalanche's
            ``IncrementalClassifier`` works too).
        head_module: name of the output ``nn.Linear`` (``None``: the model's last ``nn.Linear``).
        teacher_bn: ``"eval"``: the teacher runs in eval mode on the replayed images;
            ``"train"`` (reference): in train mode on the whole mixed mini-batch.
        replay_ratio: replayed images appended per real image (1.0 = half/half) ...
        replay_split: ... unless this is set: the fraction of the mini-batch that is replayed,
            the real part being cut to the rest (reference 0.5: batch 32 = 16 real + 16 replayed).
        replay_crop_pad, replay_flip, replay_padding: random crop (pixels of padding; padding
            with the range minimum, ``"constant"``, or the border pixels, ``"edge"``) and flip of
            replayed images.
    Misc:
        train_gan_after_last: also train the GAN after the last experience of the stream.
        real_cache_mb: the current experience's images are loaded once as a tensor for the GAN
            phase when they fit in this many MB (freed afterwards), else streamed.
        mixed_precision: ``"no"``, ``"fp16"`` (CUDA) or ``"bf16"``, through ``accelerate``.
        seed: seeds the torch generator used for z, labels, noise and augmentation.
        progress: show tqdm bars for the GAN steps.
    """

    resolution: int | None = None
    num_classes: int | None = None
    z_dim: int = 64
    embed_dim: int = 32
    w_dim: int = 64
    mapping_layers: int = 2
    g_channel_base: int = 256
    g_channel_max: int = 32
    output_activation: str = "sigmoid"
    output_range: tuple | None = None
    g_family: str = "stylegan2"
    d_channels: int = 64
    mbstd_group: int = 4
    d_cmap_dim: int | None = None
    d_family: str = "compact"
    gan_steps_first: int = 800
    gan_steps: int = 800
    gan_stop: str = "fidelity"
    gan_min_steps: int = 100
    fidelity_every: int = 50
    fidelity_threshold: float = 0.85
    fidelity_min_delta: float = 0.01
    fidelity_holdout: float = 0.2
    fidelity_probe_steps: int = 120
    measure_fidelity: bool = True
    gan_batch_size: int = 64
    g_lr: float = 0.0025
    d_lr: float = 0.0025
    adam_betas: tuple[float, float] = (0.0, 0.99)
    gan_optimizer_reset: bool = False
    r1_gamma: float = 0.5
    r1_interval: int = 16
    r1_lazy_scaling: str = "interval"
    ema_kimg: float = 5.0
    ema_rampup: float | None = 0.05
    ema_ramp_phase: float | None = None
    g_distill_weight: float = 10.0
    g_distill_std: tuple[float, ...] | None = None
    gan_checkpoint_every: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    ada_target: float = 0.5
    ada_p_max: float = 0.5
    ada_interval: int = 4
    ada_kimg: float = 20.0
    ce_weight: float = 1.0
    kd_weight: float = 3.0
    fd_weight: float = 1.0
    fd_distance: str = "rms"
    kd_temperature: float = 1.0
    head: str = "fresh_per_task"
    head_module: str | None = None
    teacher_bn: str = "train"
    replay_ratio: float = 1.0
    replay_split: float | None = None
    replay_crop_pad: int = 2
    replay_flip: bool = False
    replay_padding: str = "constant"
    train_gan_after_last: bool = False
    real_cache_mb: float = 512.0
    mixed_precision: str = "no"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        if self.output_range is not None:
            self.output_range = tuple(  # type: ignore[assignment]
                tuple(v) if isinstance(v, (list, tuple)) else float(v) for v in self.output_range
            )
        if self.g_distill_std is not None:
            self.g_distill_std = tuple(float(v) for v in self.g_distill_std)
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]
        for name, valid in _CHOICES.items():
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"GeniferConfig.{name} must be one of {valid}, got {getattr(self, name)!r}"
                )
        if self.gan_batch_size < 2:
            raise ValueError("gan_batch_size must be >= 2 (half real, half replayed for t > 0)")
        if self.replay_ratio < 0:
            raise ValueError("replay_ratio must be >= 0")
        if self.replay_split is not None and not 0 < self.replay_split < 1:
            raise ValueError("replay_split must be in (0, 1) (e.g. 0.5 = half of the mini-batch)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """Hash of the settings that change results (everything but ``progress``)."""
        d = self.to_dict()
        d.pop("progress")
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeniferConfig:
        """Build from a dict; unknown keys are an error (no silently ignored typos)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown GeniferConfig keys {unknown}; valid keys: {sorted(names)}")
        data = dict(data)
        if isinstance(data.get("augment"), dict):
            aug_names = {f.name for f in fields(AugmentConfig)}
            bad = sorted(set(data["augment"]) - aug_names)
            if bad:
                raise ValueError(f"unknown AugmentConfig keys {bad}; valid: {sorted(aug_names)}")
            data["augment"] = AugmentConfig(**data["augment"])
        return cls(**data)

    def quick(self) -> GeniferConfig:
        """A much shorter copy for tests and CI (same architecture, few GAN steps)."""
        return replace(
            self,
            gan_steps_first=min(self.gan_steps_first, 40),
            gan_steps=min(self.gan_steps, 40),
            gan_min_steps=min(self.gan_min_steps, 20),
            fidelity_every=min(self.fidelity_every, 20),
            fidelity_probe_steps=min(self.fidelity_probe_steps, 20),
            progress=False,
        )
