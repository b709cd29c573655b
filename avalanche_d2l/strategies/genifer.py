"""Genifer: generative feature-driven image replay (Thandiackal et al., IVC 2024).

Data-free class-incremental learning. After each experience a class-conditional style-based
generator G is trained so that the *classifier's hidden features* of its images cannot be told
from those of real images by a discriminator D on those features (D never sees pixels; see
:mod:`avalanche_d2l.models.feature_gan`). On the next experience G's images of old classes are
replayed to the whole classifier, distilling from a frozen copy of the previous classifier. No
real image of a past experience is kept.

The whole method lives in :class:`GeniferPlugin`; :class:`Genifer` is ``SupervisedTemplate`` with
that plugin, so ``Naive(model=..., optimizer=..., plugins=[GeniferPlugin(...)])`` is the same
algorithm. Where it hooks in:

* ``before_training_exp``: at the first experience, the image shape, value range and number of
  classes are read from the data and G and D are built (before any training). With
  ``head="fresh_per_task"`` the output rows of classes new to the model are re-initialised.
* ``before_forward`` (t >= 1): replayed images of old classes, generated per batch as tensors by
  the EMA generator, join the mini-batch (appended, or replacing part of it with
  ``replay_split``); the frozen teacher's logits and features on them are computed (teacher in
  eval mode, or in train mode on the whole mixed batch with ``teacher_bn="train"``).
* ``after_forward``: the replayed part is split off, so the criterion and the training metrics see
  only the real images; the student's features are read by a forward hook. With
  ``head="fresh_per_task"`` the logits of classes not seen yet are masked (here and at eval).
* ``before_backward``: ``loss = ce_weight*CE(real) + kd_weight*KD(replayed, old classes)
  + fd_weight*||f_student - f_teacher||`` (0.02 / 0.98 / 1.0 in the paper).
* ``after_training_exp``: the teacher is frozen from the trained classifier and the GAN is
  trained on its features (skipped after the last experience of a stream whose length is known;
  set ``train_gan_after_last=True`` to always train).

The :class:`GeniferConfig` defaults are the CPU preset of the 16 px offline streams; the authors'
CIFAR-100 setting is the ``genifer`` section of the ``genifer_cifar100`` experiment file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.nn import functional as F

from avalanche_d2l.augment import AugmentConfig
from avalanche_d2l.models.feature_gan import FeatureGANTrainer, feature_shape, frozen_copy
from avalanche_d2l.models.gan import (
    FeatureDiscriminator,
    GeneratorConfig,
    StyleGenerator,
    next_power_of_two,
)
from avalanche_d2l.registry import RunConfig, benchmark_image_shape, register_strategy
from avalanche_d2l.utils import FeatureHook, get_module, training_mode

__all__ = ["Genifer", "GeniferConfig", "GeniferPlugin", "build_genifer"]

_CHOICES = {
    "mixed_precision": ("no", "fp16", "bf16"),
    "head": ("fixed", "fresh_per_task"),
    "teacher_bn": ("eval", "train"),
    "r1_lazy_scaling": ("interval", "reference"),
    "g_family": ("stylegan2", "reference"),
    "d_family": ("compact", "reference"),
    "replay_padding": ("constant", "edge"),
}
_MASK_VALUE = -1e4  # logit of a class the model has not seen (softmax weight exactly 0)


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
        gan_steps_first: G/D steps after the first experience; gan_steps: after later ones.
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
            with 100 RAdam epochs). The CPU default 1 / 3 / 0.1 is tuned for 10 epochs per
            experience on split_digits (see the README's Genifer variants table).
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
    gan_steps_first: int = 200
    gan_steps: int = 200
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
    fd_weight: float = 0.1
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
            progress=False,
        )


def _is_last_experience(experience) -> bool:
    """True when the stream's length is known and ``experience`` is its last one."""
    try:
        return experience.current_experience == len(experience.origin_stream) - 1
    except (AttributeError, TypeError, NotImplementedError):
        return False


def _value_range(dataset, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (min, max) of up to 1024 images of ``dataset`` (eval transforms)."""
    ds = dataset.eval() if hasattr(dataset, "eval") else dataset
    x = next(iter(torch.utils.data.DataLoader(ds, batch_size=1024, shuffle=False)))[0]
    x = x.float().transpose(0, 1).reshape(channels, -1)
    return tuple(x.min(1).values.tolist()), tuple(x.max(1).values.tolist())


class GeniferPlugin(SupervisedPlugin):
    """All of Genifer's state and logic (see the module docstring for the schedule).

    Args:
        feature_layer: module name (``model.named_modules()``) whose output the discriminator
            reads and the feature distillation compares, e.g. ``"layer3"`` or ``"block3"``.
        config: settings; defaults to :class:`GeniferConfig` ().
        generator: a :class:`StyleGenerator` to use; built to fit the data when omitted.
        image_shape: ``(C, H, W)`` of the classifier's input; read from the first experience
            when omitted.
        checkpoint_dir: folder for mid-phase GAN checkpoints (``config.gan_checkpoint_every``).
    """

    def __init__(
        self,
        *,
        feature_layer: str,
        config: GeniferConfig | None = None,
        generator: StyleGenerator | None = None,
        image_shape: Sequence[int] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.feature_layer = feature_layer
        self.config = config or GeniferConfig()
        self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)
        if self.image_shape is not None and len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}")
        self.checkpoint_dir = None if checkpoint_dir is None else str(checkpoint_dir)
        self.rng = torch.Generator().manual_seed(self.config.seed)
        self.gan = FeatureGANTrainer(config=self.config, rng=self.rng)
        if generator is not None:
            self.gan.set_generator(generator)
        self.teacher: nn.Module | None = None
        self.seen_classes: list[int] = []  # classes the teacher was trained on
        self.generated_classes: list[int] = []  # classes the generator was trained on
        self.active_classes: list[int] = []  # classes the model may predict now (fresh head)
        # transient, per-iteration state (never pickled)
        self._hook: FeatureHook | None = None
        self._replay: dict[str, Any] | None = None
        self._replay_classes: list[int] = []

    # ------------------------------------------------------------------ GAN parts
    @property
    def generator(self) -> StyleGenerator | None:
        return self.gan.generator

    @property
    def generator_ema(self) -> StyleGenerator | None:
        return self.gan.generator_ema

    @property
    def discriminator(self) -> FeatureDiscriminator | None:
        return self.gan.discriminator

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.gan.history

    # ------------------------------------------------------------------ pickling / state
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_hook"] = None  # hook handles and per-batch tensors are not part of the state
        state["_replay"] = None
        return state

    def state_dict(self) -> dict[str, Any]:
        """GAN trainer state, teacher, classes, image shape, RNG."""
        return {
            "config": self.config.to_dict(),
            "feature_layer": self.feature_layer,
            "image_shape": self.image_shape,
            "gan": self.gan.state_dict(),
            "teacher": None if self.teacher is None else self.teacher.state_dict(),
            "seen_classes": list(self.seen_classes),
            "generated_classes": list(self.generated_classes),
            "active_classes": list(self.active_classes),
            "rng_state": self.rng.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any], *, model: nn.Module | None = None) -> None:
        """Restore :meth:`state_dict`. ``model`` (the classifier) is needed to rebuild the teacher
        when this plugin has none yet."""
        if state["feature_layer"] != self.feature_layer:
            raise ValueError(
                f"state is for feature_layer={state['feature_layer']!r}, this plugin "
                f"uses {self.feature_layer!r}"
            )
        self.gan.load_state_dict(state["gan"])
        self.image_shape = None if state["image_shape"] is None else tuple(state["image_shape"])
        if state["teacher"] is not None:
            if self.teacher is None:
                if model is None:
                    raise ValueError(
                        "this state has a teacher classifier: pass model=<the "
                        "classifier> to load_state_dict so it can be rebuilt"
                    )
                self.teacher = frozen_copy(model)
            self.teacher.load_state_dict(state["teacher"])
        self.seen_classes = list(state["seen_classes"])
        self.generated_classes = list(state["generated_classes"])
        self.active_classes = list(state["active_classes"])
        self.rng.set_state(state["rng_state"])

    # ------------------------------------------------------------------ fitting to the data
    def _num_classes(self, experience) -> int:
        if self.config.num_classes is not None:
            return self.config.num_classes
        try:
            return int(experience.origin_stream.benchmark.n_classes)
        except AttributeError as err:
            raise ValueError(
                "cannot infer the number of classes of the benchmark: set GeniferConfig.num_classes"
            ) from err

    def fit_to_data(
        self,
        *,
        image_shape: Sequence[int],
        num_classes: int,
        classifier: nn.Module,
        value_range: tuple | None = None,
    ) -> None:
        """Build G (unless given) for images of ``image_shape`` and D for the classifier's
        features; check that a given generator fits.

        Raises:
            ValueError: the shape cannot be served (with what to pass instead).
        """
        cfg = self.config
        if len(image_shape) != 3:
            raise ValueError(
                f"Genifer needs image batches (N, C, H, W); got samples of shape "
                f"{tuple(image_shape)}: pass image_shape=(C, H, W) of the model's "
                "input or reshape the dataset's images"
            )
        c, h, w = (int(s) for s in image_shape)
        if min(h, w) < 4:
            raise ValueError(
                f"images of {h}x{w} px are too small for the generator (>= 4 px): "
                "resize the benchmark's images"
            )
        self.image_shape = (c, h, w)
        if self.generator is None:
            res = cfg.resolution or next_power_of_two(max(h, w))
            out_range = cfg.output_range if cfg.output_range is not None else value_range
            if out_range is None:
                raise ValueError(
                    "no output_range: set GeniferConfig.output_range to the value "
                    "range of the classifier's input, e.g. (0.0, 1.0)"
                )
            gen_cfg = GeneratorConfig(
                num_classes=num_classes,
                resolution=res,
                img_channels=c,
                z_dim=cfg.z_dim,
                embed_dim=cfg.embed_dim,
                w_dim=cfg.w_dim,
                mapping_layers=cfg.mapping_layers,
                channel_base=cfg.g_channel_base,
                channel_max=cfg.g_channel_max,
                output_activation=cfg.output_activation,
                output_range=tuple(out_range),
                family=cfg.g_family,
                output_size=None if (h, w) == (res, res) else (h, w),
            )
            # initialised from the config's seed, leaving the global RNG (data order) untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                self.gan.set_generator(StyleGenerator(config=gen_cfg))
        gc = self.generator.config  # type: ignore[union-attr]
        made = (gc.img_channels, *(gc.output_size or (gc.resolution, gc.resolution)))
        if tuple(made) != (c, h, w):
            raise ValueError(
                f"the generator makes {made[0]}x{made[1]}x{made[2]} images but the data is "
                f"{c}x{h}x{w}: pass a generator with GeneratorConfig(img_channels={c}, "
                f"output_size=({h}, {w})) or none (it is then built from the data)"
            )
        if self.discriminator is None:
            shape = feature_shape(classifier, self.feature_layer, (c, h, w))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + 1)
                self.gan.build_discriminator(shape, gc.num_classes)

    def build_models(
        self,
        *,
        image_shape: Sequence[int],
        num_classes: int,
        classifier: nn.Module,
        value_range: tuple | None = None,
    ) -> None:
        """Build G, its EMA copy and D for ``image_shape`` (value range: ``config.output_range``,
        else ``value_range``)."""
        self.fit_to_data(
            image_shape=image_shape,
            num_classes=num_classes,
            classifier=classifier,
            value_range=value_range,
        )

    def _setup(self, strategy) -> None:
        exp = strategy.experience
        shape = self.image_shape or tuple(exp.dataset[0][0].shape)
        value_range = None
        if self.generator is None and self.config.output_range is None:
            value_range = _value_range(exp.dataset, int(shape[0]))
        self.fit_to_data(
            image_shape=shape,
            num_classes=self._num_classes(exp),
            classifier=strategy.model,
            value_range=value_range,
        )

    # ------------------------------------------------------------------ output head
    def _head(self, model: nn.Module) -> nn.Linear:
        if self.config.head_module is not None:
            head = get_module(model, self.config.head_module)
            if not isinstance(head, nn.Linear):
                raise ValueError(
                    f"head_module {self.config.head_module!r} is a "
                    f"{type(head).__name__}, not an nn.Linear"
                )
            return head
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                "head='fresh_per_task' needs the model's output nn.Linear: set "
                "GeniferConfig.head_module to its name"
            )
        return linears[-1]

    @torch.no_grad()
    def _fresh_rows(self, model: nn.Module, classes: Sequence[int]) -> None:
        """Re-initialise the output rows of ``classes`` (nn.Linear's default init)."""
        head = self._head(model)
        rows = [c for c in classes if c < head.out_features]
        if not rows:
            return
        bound = 1 / math.sqrt(head.in_features)
        idx = torch.as_tensor(rows, device=head.weight.device)
        w = (torch.rand(len(rows), head.in_features, generator=self.rng) * 2 - 1) * bound
        head.weight.index_copy_(0, idx, w.to(head.weight))
        if head.bias is not None:
            b = (torch.rand(len(rows), generator=self.rng) * 2 - 1) * bound
            head.bias.index_copy_(0, idx, b.to(head.bias))

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of classes outside ``active_classes`` set to a large negative value
        (``head="fresh_per_task"``; identity otherwise or before any experience)."""
        if self.config.head != "fresh_per_task" or not self.active_classes:
            return logits
        mask = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
        active = torch.as_tensor(
            [c for c in self.active_classes if c < logits.shape[1]],
            dtype=torch.long,
            device=logits.device,
        )
        mask[active] = False
        return logits.masked_fill(mask, _MASK_VALUE)

    # ------------------------------------------------------------------ Avalanche hooks
    def before_training(self, strategy, **kwargs) -> None:
        get_module(strategy.model, self.feature_layer)  # clear error for a wrong name

    def before_training_exp(self, strategy, **kwargs) -> None:
        if self.generator is None or self.discriminator is None:
            self._setup(strategy)  # G and D fit to the data before any training
        current = [int(c) for c in strategy.experience.classes_in_this_experience]
        if self.config.head == "fresh_per_task" and self.seen_classes:
            self._fresh_rows(strategy.model, [c for c in current if c not in self.seen_classes])
        self.active_classes = sorted(set(self.seen_classes) | set(current))
        device = strategy.device
        ready = self.teacher is not None and self.generated_classes
        self._replay_classes = list(self.generated_classes) if ready else []
        if ready:
            self.teacher.to(device)  # type: ignore[union-attr]
            self.generator_ema.to(device)  # type: ignore[union-attr]

    def before_forward(self, strategy, **kwargs) -> None:
        if not strategy.is_training or not self._replay_classes:
            return
        cfg = self.config
        mb = list(strategy.mbatch)
        batch = mb[0].shape[0]
        if cfg.replay_split is not None:  # replayed images replace part of the mini-batch
            n = max(1, int(cfg.replay_split * batch))
            n_real = max(1, batch - n)
            mb = [t[:n_real] for t in mb]
        else:
            n = max(1, round(batch * cfg.replay_ratio))
            n_real = batch
        x = mb[0]
        g = self.generator_ema
        teacher = self.teacher
        with torch.no_grad():
            # 1. old-class images from the frozen EMA generator, generated as one tensor
            labels = g.sample_labels(n, self._replay_classes, generator=self.rng)  # type: ignore
            xr = g.generate(n, labels, generator=self.rng)  # type: ignore[union-attr]
            xr = self._replay_transform(g.clamp(xr)).to(x.dtype)  # type: ignore[union-attr]
            # 2. the teacher's logits and features on them (train mode: on the mixed batch)
            hook = FeatureHook(teacher, self.feature_layer)  # type: ignore[arg-type]
            try:
                if cfg.teacher_bn == "train":
                    with training_mode(teacher, True):  # type: ignore[arg-type]
                        t_logits = teacher(torch.cat([x, xr]))[n_real:]  # type: ignore[misc]
                        t_feat = hook.pop()[n_real:]
                else:
                    t_logits = teacher(xr)  # type: ignore[misc]
                    t_feat = hook.pop()
            finally:
                hook.remove()
        # 3. join them to the mini-batch and watch the student's features
        mb[0] = torch.cat([x, xr])
        mb[1] = torch.cat([mb[1], labels.to(mb[1].device, mb[1].dtype)])
        for i in range(2, len(mb)):  # task labels and any other per-sample field
            mb[i] = torch.cat([mb[i], mb[i][:1].expand(n, *mb[i].shape[1:])])
        strategy.mbatch = mb
        self._replay = {"n_real": n_real, "t_logits": t_logits, "t_feat": t_feat}
        self._hook = FeatureHook(strategy.model, self.feature_layer)

    def after_forward(self, strategy, **kwargs) -> None:
        out = self.mask_logits(strategy.mb_output)
        if self._replay is None:
            strategy.mb_output = out
            return
        hook, self._hook = self._hook, None
        try:
            feats = hook.pop()  # type: ignore[union-attr]
        finally:
            hook.remove()  # type: ignore[union-attr]
        n = self._replay["n_real"]
        self._replay["s_logits"] = out[n:]
        self._replay["s_feat"] = feats[n:]
        # the criterion and the training metrics see the real images only
        strategy.mb_output = out[:n]
        strategy.mbatch = [t[:n] for t in strategy.mbatch]

    def after_eval_forward(self, strategy, **kwargs) -> None:
        strategy.mb_output = self.mask_logits(strategy.mb_output)

    def before_backward(self, strategy, **kwargs) -> None:
        if self._replay is None:
            return
        r, self._replay = self._replay, None
        cfg = self.config
        ce = strategy.criterion()  # already in strategy.loss with weight 1
        kd = self.kd_loss(r["s_logits"], r["t_logits"])
        fd = (r["s_feat"] - r["t_feat"]).flatten(1).norm(dim=1).mean()
        strategy.loss = (
            strategy.loss + (cfg.ce_weight - 1.0) * ce + cfg.kd_weight * kd + cfg.fd_weight * fd
        )

    def after_training_exp(self, strategy, **kwargs) -> None:
        if self._hook is not None:  # an interrupted iteration must not leave a hook behind
            self._hook.remove()
            self._hook = None
        self._replay = None
        exp = strategy.experience
        new = [int(c) for c in exp.classes_in_this_experience]
        self.seen_classes = sorted(set(self.seen_classes) | set(new))
        self.active_classes = list(self.seen_classes)
        # C_t: frozen copy of the classifier; teacher of the next experience and D's feature map
        self.teacher = frozen_copy(strategy.model)
        if _is_last_experience(exp) and not self.config.train_gan_after_last:
            return  # no later experience will replay (set train_gan_after_last to override)
        self.train_gan(experience=exp, device=torch.device(strategy.device))

    # ------------------------------------------------------------------ losses
    def kd_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``-sum_{c in old} softmax(teacher/T)_c * log_softmax(student/T)_c`` (times T^2).

        The teacher's softmax runs over its old classes only (a grown IncrementalClassifier
        head, or a fixed head with unused units); the student's over all its (unmasked) outputs.
        """
        old = torch.as_tensor(self.seen_classes, device=teacher_logits.device)
        temp = self.config.kd_temperature
        p_t = torch.softmax(teacher_logits.index_select(1, old).float() / temp, dim=1)
        log_s = torch.log_softmax(student_logits.float() / temp, dim=1).index_select(1, old)
        return -(p_t * log_s).sum(dim=1).mean() * temp * temp

    def _replay_transform(self, x: torch.Tensor) -> torch.Tensor:
        """Random crop (padded by ``replay_crop_pad`` px with the range minimum or the border
        pixels) + flip, drawn per image."""
        cfg = self.config
        n, c, h, w = x.shape
        pad = cfg.replay_crop_pad
        if pad > 0:
            if cfg.replay_padding == "edge":
                xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
            else:
                low = self.generator_ema.range_low.to(x)  # type: ignore[union-attr]
                xp = F.pad(x - low, (pad, pad, pad, pad)) + low
            oy = torch.randint(0, 2 * pad + 1, (n,), generator=self.rng).to(x.device)
            ox = torch.randint(0, 2 * pad + 1, (n,), generator=self.rng).to(x.device)
            rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            idx_n = torch.arange(n, device=x.device)[:, None, None, None]
            idx_c = torch.arange(c, device=x.device)[None, :, None, None]
            x = xp[idx_n, idx_c, rows, cols]
        if cfg.replay_flip:
            flip = (torch.rand(n, generator=self.rng) < 0.5).to(x.device)[:, None, None, None]
            x = torch.where(flip, x.flip(3), x)
        return x

    # ------------------------------------------------------------------ GAN phase
    def gan_checkpoint_path(self, experience: int) -> Path | None:
        """Where the mid-phase checkpoint of the GAN phase after ``experience`` is written."""
        if self.checkpoint_dir is None or not self.config.gan_checkpoint_every:
            return None
        return Path(self.checkpoint_dir) / f"genifer_gan_after_exp{experience:03d}.pt"

    def train_gan(
        self, *, experience, device: torch.device | str = "cpu", steps: int | None = None
    ) -> dict[str, Any]:
        """Train G and D on the features of the frozen classifier ``self.teacher``.

        For the first GAN phase D's real batch is all real images of the experience; later, half
        are real new-class images and half old-class images of the previous generator. Returns
        (and appends to ``self.history``) a summary of the phase.
        """
        if self.teacher is None:
            raise RuntimeError(
                "train_gan needs the trained classifier: call it from "
                "after_training_exp (it sets plugin.teacher)"
            )
        cfg = self.config
        device = torch.device(device)
        classifier = self.teacher.to(device)
        new = [int(c) for c in experience.classes_in_this_experience]
        old = [c for c in self.generated_classes if c not in new]
        if self.generator is None or self.discriminator is None:
            shape = self.image_shape or tuple(experience.dataset[0][0].shape)
            value_range = None
            if self.generator is None and cfg.output_range is None:
                value_range = _value_range(experience.dataset, int(shape[0]))
            self.fit_to_data(
                image_shape=shape,
                num_classes=self._num_classes(experience),
                classifier=classifier,
                value_range=value_range,
            )
        if steps is None:
            steps = cfg.gan_steps if self.generated_classes else cfg.gan_steps_first
        exp_id = int(experience.current_experience)
        summary = self.gan.train_phase(
            classifier=classifier,
            feature_layer=self.feature_layer,
            dataset=experience.dataset,
            new_classes=new,
            old_classes=old,
            steps=steps,
            device=device,
            experience=exp_id,
            checkpoint_path=self.gan_checkpoint_path(exp_id),
        )
        self.generated_classes = sorted(set(self.generated_classes) | set(new))
        return summary

    # ------------------------------------------------------------------ notebooks
    @torch.no_grad()
    def sample_grid(
        self, n_per_class: int = 8, classes: Sequence[int] | None = None, *, seed: int = 0
    ) -> torch.Tensor:
        """Replayed images arranged class by class: (len(classes) * n_per_class, C, H, W).

        Use ``torchvision.utils.make_grid(grid, nrow=n_per_class)`` to draw it. Defaults to the
        classes the generator was trained on.
        """
        if self.generator_ema is None:
            raise RuntimeError("no generator yet: train at least one experience first")
        classes = list(self.generated_classes if classes is None else classes)
        if not classes:
            raise RuntimeError("the generator has not been trained on any class yet")
        labels = torch.tensor(classes).repeat_interleave(n_per_class)
        rng = torch.Generator().manual_seed(seed)
        x = self.generator_ema.generate(len(labels), labels, generator=rng)
        return self.generator_ema.clamp(x).cpu()


class Genifer(SupervisedTemplate):
    """Genifer strategy: ``SupervisedTemplate`` + :class:`GeniferPlugin` (``self.genifer``).

    Args:
        model: any classifier ``nn.Module`` (fixed single head or with an
            ``IncrementalClassifier`` head).
        optimizer: the classifier's optimiser.
        feature_layer: module name read by the discriminator and the feature distillation.
        criterion: classification loss on the real images.
        generator: optional :class:`StyleGenerator`; built from the data when omitted.
        config: :class:`GeniferConfig` (CPU preset when omitted).
        image_shape: ``(C, H, W)`` of the model's input; read from the first experience when
            omitted.
        checkpoint_dir: folder for mid-phase GAN checkpoints.
        train_mb_size, train_epochs, eval_mb_size, device, plugins, evaluator, eval_every,
            peval_mode: as for Avalanche's ``SupervisedTemplate``.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        feature_layer: str,
        criterion: nn.Module | None = None,
        generator: StyleGenerator | None = None,
        config: GeniferConfig | None = None,
        image_shape: Sequence[int] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        train_mb_size: int = 32,
        train_epochs: int = 1,
        eval_mb_size: int = 256,
        device: str | torch.device = "cpu",
        plugins: Sequence[Any] | None = None,
        evaluator=default_evaluator,
        eval_every: int = -1,
        peval_mode: str = "epoch",
    ):
        get_module(model, feature_layer)  # fail early with the list of valid names
        plugin = GeniferPlugin(
            feature_layer=feature_layer,
            config=config,
            generator=generator,
            image_shape=image_shape,
            checkpoint_dir=checkpoint_dir,
        )
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=[plugin, *(plugins or [])],
            evaluator=evaluator,
            eval_every=eval_every,
            peval_mode=peval_mode,
        )
        self.genifer = plugin


@register_strategy(
    "genifer",
    config=GeniferConfig,
    keeps_buffer=False,
    description="Genifer: data-free generative feature-driven image replay",
)
def build_genifer(
    *,
    model,
    optimizer,
    criterion,
    benchmark,
    run: RunConfig,
    config: GeniferConfig | None,
    evaluator,
    device,
    plugins=None,
) -> Genifer:
    """Registry factory: Genifer with ``config`` (class defaults when ``None``), seeded by
    ``run.seed``, shortened by ``run.quick``, its GAN checkpoints under ``run.work_dir``."""
    cfg = config or GeniferConfig()
    shape = benchmark_image_shape(benchmark)
    cfg = replace(
        cfg,
        seed=run.seed,
        num_classes=cfg.num_classes or int(benchmark.n_classes),
        progress=cfg.progress and run.progress,
    )
    if getattr(run, "precision", "no") != "no":
        cfg = replace(cfg, mixed_precision=run.precision)
    if run.quick:
        cfg = cfg.quick()
    return Genifer(
        model=model,
        optimizer=optimizer,
        criterion=criterion,
        feature_layer=run.feature_layer,
        config=cfg,
        image_shape=shape,
        checkpoint_dir=run.work_dir,
        train_mb_size=run.train_mb_size,
        train_epochs=run.epochs,
        eval_mb_size=run.eval_mb_size,
        device=device,
        plugins=plugins,
        evaluator=evaluator,
    )
