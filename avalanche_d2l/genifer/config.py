"""Genifer's settings: a :class:`GeniferConfig` of five typed parts, its checks, its dict round
trip and fingerprint.

=================  ===========================================================================
part               what it sets
=================  ===========================================================================
``generator``      :class:`GeneratorSettings`: the class-conditional style-based generator
``discriminator``  :class:`DiscriminatorSettings`: the discriminator on the classifier's features
``gan``            :class:`GanSettings`: one GAN phase: its length and fidelity stop, optimisers,
                   R1, EMA, self-distillation, checkpoints
``augment``        :class:`AugmentSettings`: the adaptive augmentation of the GAN phase
``replay``         :class:`ReplaySettings`: the classifier's training on t >= 1: replayed images,
                   loss weights, the teacher
=================  ===========================================================================

Experiment files hold the same nesting (``{"gan": {"steps": 400}, "replay": {"kd_weight": 2}}``).
Flat keys of earlier files (``gan_steps``, ``kd_weight``, ...) are read into their new place with
a ``DeprecationWarning`` naming it (:data:`RENAMED_KEYS`).
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from avalanche_d2l.augment import AugmentConfig
from avalanche_d2l.core.config import ConfigBase, merge_sections
from avalanche_d2l.fields import check_value

__all__ = [
    "AugmentSettings",
    "DiscriminatorSettings",
    "GanSettings",
    "GeneratorSettings",
    "GeniferConfig",
    "RENAMED_KEYS",
    "ReplaySettings",
    "merge_sections",
]


def _check_choices(owner: str, obj: Any, choices: dict[str, tuple]) -> None:
    for name, valid in choices.items():
        if getattr(obj, name) not in valid:
            raise ValueError(f"{owner}.{name} must be one of {valid}, got {getattr(obj, name)!r}")


@dataclass
class GeneratorSettings(ConfigBase):
    """The generator (``None``: taken from the data at the first experience).

    Attributes:
        resolution: synthesis size, a power of two (``None``: the next power of two of the data's
            side; the output is resized to the data's size when they differ).
        z_dim, embed_dim, w_dim, mapping_layers, channel_base, channel_max, output_activation:
            see :class:`avalanche_d2l.models.gan.GeneratorConfig`.
        output_range: value range of the classifier's input, ``(low, high)`` or per-channel lists
            (``None``: min/max per channel of up to 1024 real images of the first experience).
        family: ``"stylegan2"`` (demodulated, 1x1 output) or ``"reference"`` (the authors'
            layers: modulation without demodulation, 3x3 output conv; use with
            ``output_activation="none"`` for their linear output).
    """

    resolution: int | None = None
    z_dim: int = 64
    embed_dim: int = 32
    w_dim: int = 64
    mapping_layers: int = 2
    channel_base: int = 256
    channel_max: int = 32
    output_activation: str = "sigmoid"
    output_range: tuple[Any, ...] | None = None
    family: str = "stylegan2"

    def __post_init__(self) -> None:
        if self.output_range is not None:
            self.output_range = tuple(  # type: ignore[assignment]
                tuple(v) if isinstance(v, (list, tuple)) else float(v) for v in self.output_range
            )
        _check_choices("GeniferConfig.generator", self, {"family": ("stylegan2", "reference")})


@dataclass
class DiscriminatorSettings(ConfigBase):
    """The discriminator on the classifier's features.

    Attributes:
        channels: width of D; mbstd_group: minibatch-stddev group size; cmap_dim: size of the
            projection space (``None``: ``channels``); family: ``"compact"`` or ``"reference"``.
    """

    channels: int = 64
    mbstd_group: int = 4
    cmap_dim: int | None = None
    family: str = "compact"

    def __post_init__(self) -> None:
        _check_choices("GeniferConfig.discriminator", self, {"family": ("compact", "reference")})


@dataclass
class GanSettings(ConfigBase):
    """One GAN phase (after every experience).

    Length:
        steps_first: G/D steps after the first experience; steps: after later ones (with
            ``stop="fidelity"``: the caps).
        stop: ``"fidelity"``: the phase ends when every class's replay passes ``threshold``
            (train-on-replay-test-on-real accuracy, checked every ``check_every`` steps) and the
            mean gains less than ``min_delta`` over the best earlier check, not before
            ``min_steps`` (the floor). Both are judged on each class's accuracy averaged
            over the last ``stop_window`` checks (one check is noisy: with 1, the rule of
            earlier versions, phases ended on a lucky check). After every phase a fresh
            probe measures the replay once more; a class below the threshold then is named in
            a warning and in the phase's summary, whether the phase stopped early or at the
            cap. ``"fixed"`` (the reference): exactly ``steps_first`` / ``steps`` steps.
        max_separability: (an experiment, ``None`` by default: not asked) with
            ``stop="fidelity"``, every check also trains a probe to tell the replay from real
            images (balanced accuracy on held-out images, 0.5 = indistinguishable), and the phase
            may end only when that figure, averaged over the same ``stop_window`` checks, is at
            most this. The fidelity test alone passes long before the replay stops being
            separable (``benchmarks/genifer_separability.py``).
        measure_fidelity: measure the replay's fidelity after every phase (see
            :mod:`avalanche_d2l.genifer.fidelity`): ``holdout`` of the experience's images are
            held out of the GAN phase for it; ``probe_steps`` trains each probe; its head sees
            the feature map pooled to ``probe_pool`` x ``probe_pool`` cells (1: global pooling,
            the earlier probe, too weak to pass the threshold on real images; see
            :class:`avalanche_d2l.genifer.fidelity.ProbeSettings`).
        after_last: also train the GAN after the last experience of the stream.
        keep_best: (an experiment, off by default) when a phase ends at its cap, the EMA
            generator goes back to the check whose worst class scored highest (the figure swings
            between checks). Not kept across a resume from a mid-phase GAN checkpoint.
    Training:
        batch_size, g_lr, d_lr, adam_betas: Adam settings for G and D.
        optimizer_reset: new Adam optimisers at every GAN phase (reference) instead of keeping
            their state.
        r1_gamma, r1_interval: lazy R1 penalty on the real *features* every N steps.
        r1_lazy_scaling: ``"interval"``: penalty x gamma/2 x N (StyleGAN2's lazy weighting);
            ``"reference"``: x gamma/2 x N/(N+1), with D's lr x N/(N+1) and betas ** (N/(N+1)).
        ema_kimg: half-life of the EMA generator in thousands of images.
        ema_rampup: StyleGAN2 ramp: the half-life is at most this fraction of all images shown so
            far (``None``: no ramp).
        ema_ramp_phase: when set, the half-life instead grows linearly from 0 over this fraction
            of *every* phase (the reference ramps over about the first half).
        distill_weight: self-distillation weight, multiplied by n_old / n_new classes.
        class_weight: (an experiment, 0 by default) conditioning strength: the frozen
            classifier's cross-entropy on the replay for the label it was drawn for (over the
            classes seen so far), added to G's loss with this weight (AC-GAN's generator term).
        stats_weight: (an experiment, 0 by default: off) the generator also matches, in every
            convolution of the frozen classifier up to the feature layer (not only the one D
            reads), the per-channel mean and standard deviation of the real batch (same
            labels), in units of the real spread
            (:class:`avalanche_d2l.models.feature_gan_parts.ConvStats`): the statistics prior of
            data-free inversion (DeepInversion, Yin et al., CVPR 2020), here against real
            images of the experience instead of batch-norm running statistics. A model without
            ``nn.Conv2d`` layers gets no such term. Measured in the README's one-change table
            (tag ``stats1``): it raises the 28 px and coloured streams, lowers ``split_digits``.
        image_weight: (an experiment, 0 by default: off) a second discriminator, of D's
            architecture, reads the augmented *images* (real and replayed, with their labels),
            trained with D's loss, optimiser and lazy R1; its generator loss is added to G's with
            this weight. It aims at the replay's separability from real images, which D on the
            classifier's features leaves high. Genifer's D never reads pixels; this one does, so
            with it the method is no longer purely feature-driven.
        distill_std: per-channel std the self-distillation difference is divided by (the
            reference compares in mean/std-normalised space; ``None``: the classifier's input
            space, which is that space when the data is already normalised).
        checkpoint_every: write a resumable checkpoint of a GAN phase every N steps (needs a
            ``checkpoint_dir`` on the plugin); 0 = never.
        real_cache_mb: the experience's images are loaded once as a tensor for the phase when
            they fit in this many MB (freed afterwards), else streamed.
        mixed_precision: ``"no"``, ``"fp16"`` (CUDA) or ``"bf16"``, through ``accelerate``.
    """

    # records made before these fields keep their hashes (stop_window and probe_pool are always
    # written: their defaults differ from the rules those records ran with, so they hash apart)
    omitted_at_default = {
        "keep_best": False,
        "class_weight": 0.0,
        "stats_weight": 0.0,
        "image_weight": 0.0,
        "max_separability": None,
    }

    steps_first: int = 800
    steps: int = 800
    stop: str = "fidelity"
    min_steps: int = 100
    check_every: int = 50
    threshold: float = 0.85
    min_delta: float = 0.01
    stop_window: int = 3
    max_separability: float | None = None
    measure_fidelity: bool = True
    holdout: float = 0.2
    probe_steps: int = 120
    probe_pool: int = 4
    after_last: bool = False
    keep_best: bool = False
    batch_size: int = 64
    g_lr: float = 0.0025
    d_lr: float = 0.0025
    adam_betas: tuple[float, float] = (0.0, 0.99)
    optimizer_reset: bool = False
    r1_gamma: float = 0.5
    r1_interval: int = 16
    r1_lazy_scaling: str = "interval"
    ema_kimg: float = 5.0
    ema_rampup: float | None = 0.05
    ema_ramp_phase: float | None = None
    distill_weight: float = 10.0
    class_weight: float = 0.0
    stats_weight: float = 0.0
    image_weight: float = 0.0
    distill_std: tuple[float, ...] | None = None
    checkpoint_every: int = 0
    real_cache_mb: float = 512.0
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]
        if self.distill_std is not None:
            self.distill_std = tuple(float(v) for v in self.distill_std)
        _check_choices(
            "GeniferConfig.gan",
            self,
            {
                "stop": ("fidelity", "fixed"),
                "r1_lazy_scaling": ("interval", "reference"),
                "mixed_precision": ("no", "fp16", "bf16"),
            },
        )
        if self.stop_window < 1:
            raise ValueError(
                f"GeniferConfig.gan.stop_window must be >= 1 (1: the latest check alone), "
                f"got {self.stop_window}"
            )
        if self.max_separability is not None and not 0.5 <= self.max_separability <= 1.0:
            raise ValueError(
                "GeniferConfig.gan.max_separability must be between 0.5 (replay and real images "
                f"indistinguishable) and 1.0, or null (not asked), got {self.max_separability}"
            )
        if self.probe_pool < 1:
            raise ValueError(
                f"GeniferConfig.gan.probe_pool must be >= 1 (1: global average pooling), "
                f"got {self.probe_pool}"
            )
        if self.stats_weight < 0:
            raise ValueError(
                f"GeniferConfig.gan.stats_weight must be >= 0 (0: off), got {self.stats_weight}"
            )
        if self.image_weight < 0:
            raise ValueError(
                f"GeniferConfig.gan.image_weight must be >= 0 (0: off), got {self.image_weight}"
            )
        if self.class_weight < 0:
            raise ValueError(
                f"GeniferConfig.gan.class_weight must be >= 0 (0: off), got {self.class_weight}"
            )
        if self.batch_size < 2:
            raise ValueError(
                "GeniferConfig.gan.batch_size must be >= 2 (half real, half replayed for t > 0)"
            )


@dataclass
class AugmentSettings(ConfigBase):
    """The adaptive augmentation (in image space, on real and fake before the classifier).

    Attributes:
        ops: which operations and how strong (:class:`avalanche_d2l.augment.AugmentConfig`).
        target, p_max, interval: the probability ``p`` moves towards
            ``E[sign(D(real))] = target`` every ``interval`` steps and stays below ``p_max``.
        kimg: thousands of images for a full 0 -> 1 swing of ``p``.
    """

    ops: AugmentConfig = field(default_factory=AugmentConfig)
    target: float = 0.5
    p_max: float = 0.5
    interval: int = 4
    kimg: float = 20.0

    def __post_init__(self) -> None:
        if isinstance(self.ops, Mapping):
            self.ops = AugmentConfig(**_checked(AugmentConfig, self.ops, "augment.ops"))


@dataclass
class ReplaySettings(ConfigBase):
    """The classifier's update on experiences t >= 1.

    Attributes:
        ce_weight, kd_weight, fd_weight, kd_temperature: loss weights (paper: 0.02 / 0.98 / 1.0
            with 100 RAdam epochs and ``fd_distance="norm"``). CPU default: 1 / 3 / 1.0 (rms).
        fd_distance: ``"rms"``: the feature distance per element (L2 norm over the square root of
            the number of feature values), so the same weight holds for a large conv map and a
            pooled vector; ``"norm"``: the reference's unnormalised L2 norm, whose strength grows
            with the layer's size (x128 the "rms" value at its 256x8x8 layer).
        teacher_bn: ``"eval"``: the teacher runs in eval mode on the replayed images; ``"train"``
            (reference): in train mode on the whole mixed mini-batch.
        ratio: replayed images appended per real image (1.0 = half/half) ...
        split: ... unless this is set: the fraction of the mini-batch that is replayed, the real
            part being cut to the rest (reference 0.5: batch 32 = 16 real + 16 replayed).
        crop_pad, flip, padding: random crop (pixels of padding; padding with the range minimum,
            ``"constant"``, or the border pixels, ``"edge"``) and flip of replayed images.
        kd_real: weight of a second logit distillation, on the mini-batch's *real* images of
            the new classes: the teacher in eval mode on them (as LwF does), its softmax over the
            old classes as the target; 0 turns it off. Distillation on the replay alone holds
            the classifier's answers on replay, not on real images, which it learns to tell
            apart (``benchmarks/genifer_forgetting.py``). Default 0.3: on a user CNN the bar of
            issue 23 is met in 8 of 9 runs instead of 2; on ``small_cnn`` it costs about 0.01 of
            final accuracy (README, *Genifer*). The reference code's own default
            (``out_distill_loss="KD"``) distils over the whole batch; its example configuration
            uses the replay alone (``"KD_sep"``), as the paper experiment files do (0).
        kd_real_softmax: the student's softmax in that distillation: ``"all"`` its outputs
            (as on the replay), which also pushes a real new-class image's probability to the
            old classes, against the cross-entropy; ``"old"`` the old classes only (LwF's form,
            as Avalanche's ``LwF``), which leaves the new classes to the cross-entropy.
        ce_classes: the classes the criterion on the real images ranges over: ``"seen"`` (every
            class seen so far, paper) or ``"current"``, the experience's own classes (as ER-ACE
            does for incoming data), so that it never teaches "a real image is not an old
            class"; the replay's distillation alone separates old from new classes.
        fd_on: the images of the feature distillation: ``"replay"`` (paper) or ``"real"``, the
            mini-batch's real images of the new classes (the reference's
            ``feat_dist_loss_type="onlycurr"``, with ``trunk_from_replay=False``).
        trunk_from_replay: ``False``: the replayed images' features leave the feature layer
            detached, so the layers up to it learn from real images only and the replay trains
            the layers above it, which see the features the GAN matched to real ones (the
            reference's ``"onlycurr"``; needs ``fd_on="real"`` or ``fd_weight=0``).
        domain_weight: weight of a domain confusion term (0: off): a linear probe on the
            feature layer's spatially pooled output learns to tell the mini-batch's replayed
            rows from its real ones, and its loss reaches the classifier through a gradient
            reversal, which pushes the features to stop telling them apart (the shortcut of
            ``benchmarks/genifer_forgetting.py``). The replay holds only old classes and the
            real images only new ones, so it also pushes old and new classes together: a strong
            weight keeps old classes and loses new ones (README, *Genifer*; not adopted). The
            probe starts at zero each experience and has its own Adam (``domain_lr``); under
            several processes each keeps its own probe.
    """

    ce_weight: float = 1.0
    kd_weight: float = 3.0
    fd_weight: float = 1.0
    fd_distance: str = "rms"
    kd_temperature: float = 1.0
    teacher_bn: str = "train"
    ratio: float = 1.0
    split: float | None = None
    crop_pad: int = 2
    flip: bool = False
    padding: str = "constant"
    kd_real: float = 0.3
    kd_real_softmax: str = "all"
    ce_classes: str = "seen"
    fd_on: str = "replay"
    trunk_from_replay: bool = True
    domain_weight: float = 0.0
    domain_lr: float = 0.001

    # added later: left out of the dict (and the hashes) at their defaults
    omitted_at_default = {
        "kd_real_softmax": "all",
        "ce_classes": "seen",
        "fd_on": "replay",
        "trunk_from_replay": True,
        "domain_weight": 0.0,
        "domain_lr": 0.001,
    }

    def __post_init__(self) -> None:
        _check_choices(
            "GeniferConfig.replay",
            self,
            {
                "fd_distance": ("rms", "norm"),
                "teacher_bn": ("eval", "train"),
                "padding": ("constant", "edge"),
                "fd_on": ("replay", "real"),
                "ce_classes": ("seen", "current"),
                "kd_real_softmax": ("all", "old"),
            },
        )
        if not self.trunk_from_replay and self.fd_on == "replay" and self.fd_weight > 0:
            raise ValueError(
                "GeniferConfig.replay.trunk_from_replay=False detaches the replayed images' "
                "features, so a feature distillation on them would do nothing: set "
                "replay.fd_on='real' (or replay.fd_weight=0)"
            )
        if self.ratio < 0:
            raise ValueError("GeniferConfig.replay.ratio must be >= 0")
        if self.domain_weight < 0 or self.domain_lr <= 0:
            raise ValueError(
                "GeniferConfig.replay.domain_weight must be >= 0 (0: off) and domain_lr > 0, "
                f"got {self.domain_weight} and {self.domain_lr}"
            )
        if self.kd_real < 0:
            raise ValueError(
                f"GeniferConfig.replay.kd_real must be >= 0 (0: off), got {self.kd_real}"
            )
        if self.split is not None and not 0 < self.split < 1:
            raise ValueError(
                "GeniferConfig.replay.split must be in (0, 1) (e.g. 0.5 = half of the mini-batch)"
            )


#: The parts of :class:`GeniferConfig`, by key.
PARTS: dict[str, type] = {
    "generator": GeneratorSettings,
    "discriminator": DiscriminatorSettings,
    "gan": GanSettings,
    "augment": AugmentSettings,
    "replay": ReplaySettings,
}


def _flat(part: str, *names: str) -> dict[str, str]:
    return {name: f"{part}.{name}" for name in names}


#: Flat keys of the earlier one-level config -> their path now (read with a DeprecationWarning).
RENAMED_KEYS: dict[str, str] = {
    **_flat("generator", "resolution", "z_dim", "embed_dim", "w_dim", "mapping_layers"),
    **_flat("generator", "output_activation", "output_range"),
    "g_channel_base": "generator.channel_base",
    "g_channel_max": "generator.channel_max",
    "g_family": "generator.family",
    "d_channels": "discriminator.channels",
    "mbstd_group": "discriminator.mbstd_group",
    "d_cmap_dim": "discriminator.cmap_dim",
    "d_family": "discriminator.family",
    "gan_steps_first": "gan.steps_first",
    "gan_steps": "gan.steps",
    "gan_stop": "gan.stop",
    "gan_min_steps": "gan.min_steps",
    "fidelity_every": "gan.check_every",
    "fidelity_threshold": "gan.threshold",
    "fidelity_min_delta": "gan.min_delta",
    "fidelity_holdout": "gan.holdout",
    "fidelity_probe_steps": "gan.probe_steps",
    "train_gan_after_last": "gan.after_last",
    "gan_batch_size": "gan.batch_size",
    "gan_optimizer_reset": "gan.optimizer_reset",
    "g_distill_weight": "gan.distill_weight",
    "g_distill_std": "gan.distill_std",
    "gan_checkpoint_every": "gan.checkpoint_every",
    **_flat("gan", "measure_fidelity", "g_lr", "d_lr", "adam_betas", "r1_gamma", "r1_interval"),
    **_flat("gan", "r1_lazy_scaling", "ema_kimg", "ema_rampup", "ema_ramp_phase"),
    **_flat("gan", "real_cache_mb", "mixed_precision"),
    "ada_target": "augment.target",
    "ada_p_max": "augment.p_max",
    "ada_interval": "augment.interval",
    "ada_kimg": "augment.kimg",
    **_flat("replay", "ce_weight", "kd_weight", "fd_weight", "fd_distance", "kd_temperature"),
    "teacher_bn": "replay.teacher_bn",
    "replay_ratio": "replay.ratio",
    "replay_split": "replay.split",
    "replay_crop_pad": "replay.crop_pad",
    "replay_flip": "replay.flip",
    "replay_padding": "replay.padding",
}


def _checked(cls: type, data: Any, where: str) -> dict[str, Any]:
    """``data`` as keyword arguments of dataclass ``cls``, every key known and every value of its
    annotated type, or one sentence naming the key's path."""
    if not isinstance(data, Mapping):
        raise ValueError(
            f"GeniferConfig: {where} must be an object of settings, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ValueError(
                f"GeniferConfig: unknown key {path!r}; valid keys{' of ' + where if where else ''}"
                f": {', '.join(names)}"
            )
        out[key] = check_value(value, hints[key], f"GeniferConfig: {path}")
    return out


def _nest_flat_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """Flat keys of earlier files moved to their part, each with a DeprecationWarning."""
    data = dict(data)
    old_augment = data.get("augment")
    ops = {f.name for f in dataclasses.fields(AugmentConfig)}
    if isinstance(old_augment, Mapping) and old_augment and set(old_augment) <= ops:
        warnings.warn(
            "GeniferConfig: the augmentation operations are now under 'augment.ops'; "
            "move them there",
            DeprecationWarning,
            stacklevel=3,
        )
        data["augment"] = {"ops": dict(old_augment)}
    moved = [k for k in data if k in RENAMED_KEYS]
    if moved:
        warnings.warn(
            "GeniferConfig: flat keys are read into their part ("
            + ", ".join(f"{k!r} -> {RENAMED_KEYS[k]!r}" for k in moved)
            + "); write them there. Settings the flat files did not have take this version's "
            "defaults, among them replay.kd_real=0.3 (a distillation on the real images too; "
            "set replay.kd_real to 0 for the training of those versions)",
            DeprecationWarning,
            stacklevel=3,
        )
    for key in moved:
        part, name = RENAMED_KEYS[key].split(".")
        section = data.setdefault(part, {})
        if not isinstance(section, Mapping):
            raise ValueError(f"GeniferConfig: {part} must be an object of settings")
        data[part] = {**section, name: data.pop(key)}
    return data


@dataclass
class GeniferConfig(ConfigBase):
    """All settings of Genifer. The defaults are the CPU preset of the 16 px offline streams.

    Attributes:
        generator, discriminator, gan, augment, replay: the parts (see the module docstring);
            each may also be given as a dict of its settings (``gan={"steps": 400}``), checked
            as :meth:`from_dict` checks a file.
        num_classes: size of the label space (``None``: the benchmark's ``n_classes``).
        head: ``"fixed"``: losses and prediction over every output unit; ``"fresh_per_task"``
            (reference): the rows of classes new to the model are re-initialised at the start of
            their experience and the logits of classes not seen yet are masked in CE, KD and the
            evaluation argmax (a fixed-size head behaves like a head grown per task; Avalanche's
            ``IncrementalClassifier`` works too).
        head_module: name of the output ``nn.Linear`` (``None``: the model's last ``nn.Linear``).
        seed: seeds the torch generator used for z, labels, noise and augmentation.
        progress: show tqdm bars for the GAN steps.
    """

    #: flat keys of the earlier layout -> their path (see :data:`RENAMED_KEYS`)
    RENAMED_KEYS: ClassVar[dict[str, str]] = RENAMED_KEYS
    # ConfigBase: to_dict nests every setting by part (what experiment files and run records
    # hold); the fingerprint hashes the settings that change results (all but ``progress``)
    not_fingerprinted = ("progress",)
    fingerprint_chars = 12

    generator: GeneratorSettings = field(default_factory=GeneratorSettings)
    discriminator: DiscriminatorSettings = field(default_factory=DiscriminatorSettings)
    gan: GanSettings = field(default_factory=GanSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    replay: ReplaySettings = field(default_factory=ReplaySettings)
    num_classes: int | None = None
    head: str = "fresh_per_task"
    head_module: str | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name, cls in PARTS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, cls(**_checked(cls, value, name)))
            elif not isinstance(value, cls):
                raise ValueError(
                    f"GeniferConfig.{name} must be a {cls.__name__} or a dict of its settings, "
                    f"got {type(value).__name__}"
                )
        _check_choices("GeniferConfig", self, {"head": ("fixed", "fresh_per_task")})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str | None = None) -> GeniferConfig:
        """Build from a nested dict (an experiment file's section). Beyond
        :meth:`ConfigBase.from_dict`: flat keys of earlier files are moved to their part (with a
        warning), and a message names the key's path inside the parts.

        Raises:
            ValueError: a key path that is not a setting or a value of the wrong type (one
                sentence naming its path and, for an unknown key, the valid ones).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"GeniferConfig: expected an object of settings, got {data!r}")
        top = _checked(cls, _nest_flat_keys(data), "")
        parts = {}
        for name, part in PARTS.items():
            if name in top:
                parts[name] = part(**_checked(part, top.pop(name), name))
        return cls(**parts, **top)

    def merged(self, change: Mapping[str, Any]) -> GeniferConfig:
        """A copy with ``change`` (a nested dict, e.g. ``{"gan": {"steps": 10}}``) applied."""
        return type(self).from_dict(merge_sections(self.to_dict(), change))

    def quick(self) -> GeniferConfig:
        """A much shorter copy for tests and CI (same architecture, few GAN steps of 16
        images)."""
        g = self.gan
        gan = replace(
            g,
            steps_first=min(g.steps_first, 40),
            steps=min(g.steps, 40),
            min_steps=min(g.min_steps, 20),
            check_every=min(g.check_every, 20),
            probe_steps=min(g.probe_steps, 20),
            batch_size=min(g.batch_size, 16),
        )
        return replace(self, gan=gan, progress=False)
