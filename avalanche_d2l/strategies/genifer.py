"""Genifer: generative feature-driven image replay (Thandiackal et al., IVC 2024).

Data-free class-incremental learning. After each experience a class-conditional style-based
generator G is trained so that the *classifier's hidden features* of its images cannot be told
from those of real images by a discriminator D on those features (D never sees pixels). On the
next experience G's images of old classes are replayed to the whole classifier, distilling from a
frozen copy of the previous classifier. No real image of a past experience is kept.

The whole method lives in :class:`GeniferPlugin`; :class:`Genifer` is ``SupervisedTemplate`` with
that plugin, so ``Naive(model=..., optimizer=..., plugins=[GeniferPlugin(...)])`` is the same
algorithm. Where it hooks in:

* ``before_forward`` (t >= 1): replayed images of old classes, generated per batch as tensors by
  the EMA generator, are appended to the mini-batch (half real / half replayed by default); the
  frozen teacher's logits and features on them are computed.
* ``after_forward``: the replayed part is split off, so the criterion and the training metrics see
  only the real images; the student's features are read by a forward hook.
* ``before_backward``: ``loss = ce_weight*CE(real) + kd_weight*KD(replayed, old classes)
  + fd_weight*||f_student - f_teacher||`` (0.02 / 0.98 / 1.0 in the paper).
* ``after_training_exp``: the teacher is frozen from the trained classifier and the GAN is
  trained on its features (skipped after the last experience of a stream whose length is known;
  set ``train_gan_after_last=True`` to always train).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from avalanche_d2l.augment import AdaptiveAugment, AugmentConfig
from avalanche_d2l.models.gan import (
    DiscriminatorConfig,
    FeatureDiscriminator,
    GeneratorConfig,
    StyleGenerator,
)
from avalanche_d2l.utils import FeatureHook, get_module

__all__ = ["Genifer", "GeniferConfig", "GeniferPlugin", "build_genifer", "default_config"]

_MIXED_PRECISION = ("no", "fp16", "bf16")
_CONFIG_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
CONFIG_ENV = "AVALANCHE_D2L_GENIFER_CONFIG"


@dataclass
class GeniferConfig:
    """All settings of Genifer. The defaults are the CPU-scale ``split_digits`` setting.

    Generator (``None`` = inferred from the first experience's data / the benchmark):
        resolution, num_classes, z_dim, embed_dim, w_dim, mapping_layers, g_channel_base,
        g_channel_max, output_activation, output_range -- see :class:`GeneratorConfig`.
    Discriminator:
        d_channels: width of D; mbstd_group: minibatch-stddev group size.
    GAN training (after every experience):
        gan_steps_first: G/D steps after the first experience; gan_steps: after later ones.
        gan_batch_size, g_lr, d_lr, adam_betas: Adam settings for G and D.
        r1_gamma, r1_interval: lazy R1 penalty on the real *features* every N steps.
        ema_kimg, ema_rampup: EMA of G (half-life in thousands of images; ramp-up fraction).
        g_distill_weight: self-distillation weight, multiplied by n_old / n_new classes.
    Adaptive augmentation (applied in image space to real and fake before the classifier):
        augment, ada_target, ada_p_max, ada_interval, ada_kimg.
    Classifier update on experiences t >= 1:
        ce_weight, kd_weight, fd_weight, kd_temperature: loss weights (paper: 0.02 / 0.98 / 1.0
            with 100 RAdam epochs). The CPU default 1 / 3 / 0.1 is tuned for 10 epochs per
            experience on split_digits (seed 0-1, one-at-a-time sweep): with the paper's weights
            new classes barely learn in 10 epochs (final accuracy 0.24); with 1 / 1 / 1 the
            feature term holds the backbone too tightly (0.59); KD 3 and FD 0.1 gave 0.92-0.93.
        replay_ratio: replayed images per real image in a mini-batch (1.0 = half/half).
        replay_crop_pad, replay_flip: random crop (pixels of padding) and flip of replayed images.
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
    output_range: tuple[float, float] = (0.0, 1.0)
    d_channels: int = 64
    mbstd_group: int = 4
    gan_steps_first: int = 200
    gan_steps: int = 200
    gan_batch_size: int = 64
    g_lr: float = 0.0025
    d_lr: float = 0.0025
    adam_betas: tuple[float, float] = (0.0, 0.99)
    r1_gamma: float = 0.5
    r1_interval: int = 16
    ema_kimg: float = 5.0
    ema_rampup: float | None = 0.05
    g_distill_weight: float = 10.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    ada_target: float = 0.5
    ada_p_max: float = 0.5
    ada_interval: int = 4
    ada_kimg: float = 20.0
    ce_weight: float = 1.0
    kd_weight: float = 3.0
    fd_weight: float = 0.1
    kd_temperature: float = 1.0
    replay_ratio: float = 1.0
    replay_crop_pad: int = 2
    replay_flip: bool = False
    train_gan_after_last: bool = False
    real_cache_mb: float = 512.0
    mixed_precision: str = "no"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        self.output_range = tuple(self.output_range)  # type: ignore[assignment]
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]
        if self.mixed_precision not in _MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {_MIXED_PRECISION}, "
                             f"got {self.mixed_precision!r}")
        if self.gan_batch_size < 2:
            raise ValueError("gan_batch_size must be >= 2 (half real, half replayed for t > 0)")
        if self.replay_ratio < 0:
            raise ValueError("replay_ratio must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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

    def to_json(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``{"genifer": <this config>, **extra}`` (extra: benchmark/classifier notes)."""
        payload = {"genifer": self.to_dict(), **(extra or {})}
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> GeniferConfig:
        """Read a config written by :meth:`to_json` (or a bare dict of fields)."""
        data = json.loads(Path(path).read_text())
        return cls.from_dict(data.get("genifer", data))

    def quick(self) -> GeniferConfig:
        """A much shorter copy for tests and CI (same architecture, few GAN steps)."""
        return replace(self, gan_steps_first=min(self.gan_steps_first, 40),
                       gan_steps=min(self.gan_steps, 40), progress=False)


def default_config(benchmark: str = "split_digits", *, quick: bool = False) -> GeniferConfig:
    """The config for a benchmark name: ``$AVALANCHE_D2L_GENIFER_CONFIG`` when set, else
    ``benchmarks/configs/genifer_<benchmark>.json`` when present, else the built-in CPU defaults.
    """
    env = os.environ.get(CONFIG_ENV)
    if env:
        cfg = GeniferConfig.from_json(env)
    elif (_CONFIG_DIR / f"genifer_{benchmark}.json").exists():
        cfg = GeniferConfig.from_json(_CONFIG_DIR / f"genifer_{benchmark}.json")
    else:
        cfg = GeniferConfig()
    return cfg.quick() if quick else cfg


class _StopForward(Exception):
    """Raised by :class:`_FeatureTap` to skip the classifier layers after the feature layer."""


class _FeatureTap(FeatureHook):
    """Feature hook that stops the forward pass right after the hooked layer (saves the rest)."""

    def _hook(self, module: nn.Module, inputs, output) -> None:
        super()._hook(module, inputs, output)
        raise _StopForward

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        try:
            model(x)
        except _StopForward:
            pass
        return self.pop()


def _frozen_copy(module: nn.Module) -> nn.Module:
    copy = deepcopy(module).eval()
    copy.requires_grad_(False)
    return copy


def _is_last_experience(experience) -> bool:
    """True when the stream's length is known and ``experience`` is its last one."""
    try:
        return experience.current_experience == len(experience.origin_stream) - 1
    except (AttributeError, TypeError, NotImplementedError):
        return False


class GeniferPlugin(SupervisedPlugin):
    """All of Genifer's state and logic (see the module docstring for the schedule).

    Args:
        feature_layer: module name (``model.named_modules()``) whose output the discriminator
            reads and the feature distillation compares, e.g. ``"layer3"`` or ``"block3"``.
        config: settings; defaults to :class:`GeniferConfig` ().
        generator: a :class:`StyleGenerator` to use; built to fit the data at the first GAN
            phase when omitted.
    """

    def __init__(self, *, feature_layer: str, config: GeniferConfig | None = None,
                 generator: StyleGenerator | None = None):
        super().__init__()
        self.feature_layer = feature_layer
        self.config = config or GeniferConfig()
        cfg = self.config
        self.generator: StyleGenerator | None = generator
        self.generator_ema: StyleGenerator | None = (
            _frozen_copy(generator) if generator is not None else None)  # type: ignore[assignment]
        self.discriminator: FeatureDiscriminator | None = None
        self.opt_g: torch.optim.Optimizer | None = None
        self.opt_d: torch.optim.Optimizer | None = None
        self.teacher: nn.Module | None = None
        self.ada = AdaptiveAugment(config=cfg.augment, target=cfg.ada_target,
                                   p_max=cfg.ada_p_max, kimg=cfg.ada_kimg)
        self.seen_classes: list[int] = []  # classes the teacher was trained on
        self.generated_classes: list[int] = []  # classes the generator was trained on
        self.gan_nimg = 0  # images shown to D so far (drives the EMA ramp-up)
        self.history: list[dict[str, Any]] = []  # one summary per GAN phase
        self.rng = torch.Generator().manual_seed(cfg.seed)
        # transient, per-iteration state (never pickled)
        self._hook: FeatureHook | None = None
        self._replay: dict[str, Any] | None = None
        self._replay_classes: list[int] = []

    # ------------------------------------------------------------------ pickling / state
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_hook"] = None  # hook handles and per-batch tensors are not part of the state
        state["_replay"] = None
        # torch optimisers do not always survive dill (a sentinel in torch's step wrapper):
        # keep their state_dicts and rebuild them in __setstate__
        for name in ("opt_g", "opt_d"):
            opt = state.pop(name)
            state[f"_{name}_state"] = None if opt is None else opt.state_dict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        opt_states = {n: state.pop(f"_{n}_state", None) for n in ("opt_g", "opt_d")}
        self.__dict__.update(state)
        self.opt_g = self.opt_d = None
        if opt_states["opt_g"] is not None and self.generator is not None \
                and self.discriminator is not None:
            self._make_optimizers()
            self.opt_g.load_state_dict(opt_states["opt_g"])  # type: ignore[union-attr]
            self.opt_d.load_state_dict(opt_states["opt_d"])  # type: ignore[union-attr]

    def state_dict(self) -> dict[str, Any]:
        """Generator, EMA generator, discriminator, optimisers, ADA ``p``, teacher, classes, RNG."""

        def sd(m):
            return None if m is None else m.state_dict()

        return {
            "config": self.config.to_dict(),
            "feature_layer": self.feature_layer,
            "generator_config": None if self.generator is None else asdict(self.generator.config),
            "discriminator_config": (None if self.discriminator is None
                                     else asdict(self.discriminator.config)),
            "generator": sd(self.generator),
            "generator_ema": sd(self.generator_ema),
            "discriminator": sd(self.discriminator),
            "opt_g": sd(self.opt_g),
            "opt_d": sd(self.opt_d),
            "ada": self.ada.state_dict(),
            "teacher": sd(self.teacher),
            "seen_classes": list(self.seen_classes),
            "generated_classes": list(self.generated_classes),
            "gan_nimg": self.gan_nimg,
            "history": deepcopy(self.history),
            "rng_state": self.rng.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any], *, model: nn.Module | None = None) -> None:
        """Restore :meth:`state_dict`. ``model`` (the classifier) is needed to rebuild the teacher
        when this plugin has none yet."""
        if state["feature_layer"] != self.feature_layer:
            raise ValueError(f"state is for feature_layer={state['feature_layer']!r}, this plugin "
                             f"uses {self.feature_layer!r}")
        if state["generator_config"] is not None:
            gcfg = GeneratorConfig(**state["generator_config"])
            if self.generator is None or asdict(self.generator.config) != asdict(gcfg):
                self.generator = StyleGenerator(config=gcfg)
                self.generator_ema = _frozen_copy(self.generator)  # type: ignore[assignment]
            self.generator.load_state_dict(state["generator"])
            self.generator_ema.load_state_dict(state["generator_ema"])  # type: ignore[union-attr]
        if state["discriminator_config"] is not None:
            dcfg = DiscriminatorConfig(**state["discriminator_config"])
            dcfg.feature_shape = tuple(dcfg.feature_shape)
            self.discriminator = FeatureDiscriminator(config=dcfg)
            self.discriminator.load_state_dict(state["discriminator"])
        if state["opt_g"] is not None:
            self._make_optimizers()
            self.opt_g.load_state_dict(state["opt_g"])  # type: ignore[union-attr]
            self.opt_d.load_state_dict(state["opt_d"])  # type: ignore[union-attr]
        self.ada.load_state_dict(state["ada"])
        if state["teacher"] is not None:
            if self.teacher is None:
                if model is None:
                    raise ValueError("this state has a teacher classifier: pass model=<the "
                                     "classifier> to load_state_dict so it can be rebuilt")
                self.teacher = _frozen_copy(model)
            self.teacher.load_state_dict(state["teacher"])
        self.seen_classes = list(state["seen_classes"])
        self.generated_classes = list(state["generated_classes"])
        self.gan_nimg = int(state["gan_nimg"])
        self.history = deepcopy(state["history"])
        self.rng.set_state(state["rng_state"])

    # ------------------------------------------------------------------ Avalanche hooks
    def before_training(self, strategy, **kwargs) -> None:
        get_module(strategy.model, self.feature_layer)  # clear error for a wrong name

    def before_training_exp(self, strategy, **kwargs) -> None:
        device = strategy.device
        ready = self.teacher is not None and self.generator_ema is not None
        self._replay_classes = list(self.generated_classes) if ready else []
        if ready:
            self.teacher.to(device)  # type: ignore[union-attr]
            self.generator_ema.to(device)  # type: ignore[union-attr]

    def before_forward(self, strategy, **kwargs) -> None:
        if not strategy.is_training or not self._replay_classes:
            return
        cfg = self.config
        x = strategy.mb_x
        n_real = x.shape[0]
        n = max(1, round(n_real * cfg.replay_ratio))
        g = self.generator_ema
        with torch.no_grad():
            # 1. old-class images from the frozen EMA generator, generated as one tensor
            labels = g.sample_labels(n, self._replay_classes, generator=self.rng)  # type: ignore
            xr = g.generate(n, labels, generator=self.rng)  # type: ignore[union-attr]
            xr = self._replay_transform(xr.clamp(*cfg.output_range)).to(x.dtype)
            # 2. the teacher's logits and features on them
            hook = FeatureHook(self.teacher, self.feature_layer)  # type: ignore[arg-type]
            try:
                t_logits = self.teacher(xr)  # type: ignore[misc]
                t_feat = hook.pop()
            finally:
                hook.remove()
        # 3. append them to the mini-batch and watch the student's features
        mb = list(strategy.mbatch)
        mb[0] = torch.cat([x, xr])
        mb[1] = torch.cat([mb[1], labels.to(mb[1].device, mb[1].dtype)])
        for i in range(2, len(mb)):  # task labels and any other per-sample field
            mb[i] = torch.cat([mb[i], mb[i][:1].expand(n, *mb[i].shape[1:])])
        strategy.mbatch = mb
        self._replay = {"n_real": n_real, "t_logits": t_logits, "t_feat": t_feat}
        self._hook = FeatureHook(strategy.model, self.feature_layer)

    def after_forward(self, strategy, **kwargs) -> None:
        if self._replay is None:
            return
        hook, self._hook = self._hook, None
        try:
            feats = hook.pop()  # type: ignore[union-attr]
        finally:
            hook.remove()  # type: ignore[union-attr]
        n = self._replay["n_real"]
        out = strategy.mb_output
        self._replay["s_logits"] = out[n:]
        self._replay["s_feat"] = feats[n:]
        # the criterion and the training metrics see the real images only
        strategy.mb_output = out[:n]
        strategy.mbatch = [t[:n] for t in strategy.mbatch]

    def before_backward(self, strategy, **kwargs) -> None:
        if self._replay is None:
            return
        r, self._replay = self._replay, None
        cfg = self.config
        ce = strategy.criterion()  # already in strategy.loss with weight 1
        kd = self.kd_loss(r["s_logits"], r["t_logits"])
        fd = (r["s_feat"] - r["t_feat"]).flatten(1).norm(dim=1).mean()
        strategy.loss = strategy.loss + (cfg.ce_weight - 1.0) * ce + cfg.kd_weight * kd \
            + cfg.fd_weight * fd

    def after_training_exp(self, strategy, **kwargs) -> None:
        if self._hook is not None:  # an interrupted iteration must not leave a hook behind
            self._hook.remove()
            self._hook = None
        self._replay = None
        exp = strategy.experience
        new = [int(c) for c in exp.classes_in_this_experience]
        self.seen_classes = sorted(set(self.seen_classes) | set(new))
        # C_t: frozen copy of the classifier; teacher of the next experience and D's feature map
        self.teacher = _frozen_copy(strategy.model)
        if _is_last_experience(exp) and not self.config.train_gan_after_last:
            return  # no later experience will replay (set train_gan_after_last to override)
        self.train_gan(experience=exp, device=torch.device(strategy.device))

    # ------------------------------------------------------------------ losses
    def kd_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``-sum_{c in old} softmax(teacher/T)_c * log_softmax(student/T)_c`` (times T^2).

        The teacher's softmax runs over its old classes only (a grown IncrementalClassifier
        head, or a fixed head with unused units); the student's over all its outputs.
        """
        old = torch.as_tensor(self.seen_classes, device=teacher_logits.device)
        temp = self.config.kd_temperature
        p_t = torch.softmax(teacher_logits.index_select(1, old).float() / temp, dim=1)
        log_s = torch.log_softmax(student_logits.float() / temp, dim=1).index_select(1, old)
        return -(p_t * log_s).sum(dim=1).mean() * temp * temp

    def _replay_transform(self, x: torch.Tensor) -> torch.Tensor:
        """Random crop (zero-padded by ``replay_crop_pad`` px, value = range minimum) + flip."""
        cfg = self.config
        n, c, h, w = x.shape
        pad = cfg.replay_crop_pad
        if pad > 0:
            xp = F.pad(x, (pad, pad, pad, pad), value=float(cfg.output_range[0]))
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

    # ------------------------------------------------------------------ GAN
    def _num_classes(self, experience) -> int:
        if self.config.num_classes is not None:
            return self.config.num_classes
        try:
            return int(experience.origin_stream.benchmark.n_classes)
        except AttributeError as err:
            raise ValueError("cannot infer the number of classes of the benchmark: set "
                             "GeniferConfig.num_classes") from err

    def _make_optimizers(self) -> None:
        cfg = self.config
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.g_lr,  # type: ignore
                                      betas=cfg.adam_betas, eps=1e-8)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.d_lr,  # type: ignore
                                      betas=cfg.adam_betas, eps=1e-8)

    def build_models(self, *, image_shape: Sequence[int], num_classes: int,
                     classifier: nn.Module) -> None:
        """Create G (unless given), its EMA copy, D (sized by probing the classifier), Adams."""
        cfg = self.config
        c, h, w = (int(s) for s in image_shape)
        if self.generator is None:
            if h != w and cfg.resolution is None:
                raise ValueError(f"images are {h}x{w}: set GeniferConfig.resolution for "
                                 "non-square data")
            self.generator = StyleGenerator(config=GeneratorConfig(
                num_classes=num_classes, resolution=cfg.resolution or h, img_channels=c,
                z_dim=cfg.z_dim, embed_dim=cfg.embed_dim, w_dim=cfg.w_dim,
                mapping_layers=cfg.mapping_layers, channel_base=cfg.g_channel_base,
                channel_max=cfg.g_channel_max, output_activation=cfg.output_activation,
                output_range=cfg.output_range))
            self.generator_ema = _frozen_copy(self.generator)  # type: ignore[assignment]
        gc = self.generator.config
        if (gc.img_channels, gc.resolution, gc.resolution) != (c, h, w):
            raise ValueError(f"the generator makes {gc.img_channels}x{gc.resolution}x"
                             f"{gc.resolution} images but the data is {c}x{h}x{w}; configure "
                             "resolution/channels to match the classifier's input")
        if self.generator_ema is None:
            self.generator_ema = _frozen_copy(self.generator)  # type: ignore[assignment]
        if self.discriminator is None:
            device = next(classifier.parameters()).device
            tap = _FeatureTap(classifier, self.feature_layer)
            try:
                with torch.no_grad():
                    feat = tap(classifier, torch.zeros(2, c, h, w, device=device))
            finally:
                tap.remove()
            self.discriminator = FeatureDiscriminator(config=DiscriminatorConfig(
                feature_shape=tuple(feat.shape[1:]), num_classes=gc.num_classes,
                channels=cfg.d_channels, mbstd_group=cfg.mbstd_group))
        if self.opt_g is None or self.opt_d is None:
            self._make_optimizers()

    def _accelerator(self, device: torch.device):
        """A fresh ``accelerate.Accelerator`` for autocast/backward (never kept: dill-safe)."""
        from accelerate import Accelerator

        try:
            return Accelerator(cpu=device.type == "cpu",
                               mixed_precision=self.config.mixed_precision)
        except ValueError as err:
            raise RuntimeError(
                f"could not set up accelerate with mixed_precision="
                f"{self.config.mixed_precision!r} (another Accelerator in this process uses other "
                f"settings): {err}") from err

    def _real_batches(self, dataset, n: int, device: torch.device) -> Iterator[tuple]:
        """Endless batches (images, labels) of the current experience (eval transforms).

        Small datasets are loaded once as tensors local to this generator (freed when the GAN
        phase ends; nothing is kept on the plugin); large ones are streamed by a DataLoader.
        """
        ds = dataset.eval() if hasattr(dataset, "eval") else dataset
        x0 = ds[0][0]
        nbytes = len(ds) * x0.numel() * 4
        if nbytes <= self.config.real_cache_mb * 2**20:
            xs, ys = [], []
            for batch in torch.utils.data.DataLoader(ds, batch_size=512, shuffle=False):
                xs.append(batch[0])
                ys.append(batch[1])
            xs_t, ys_t = torch.cat(xs).to(device), torch.cat(ys).long().to(device)
            total = len(ys_t)
            while True:
                if total >= n:
                    perm = torch.randperm(total, generator=self.rng).to(device)
                    for i in range(0, total - n + 1, n):
                        idx = perm[i:i + n]
                        yield xs_t[idx], ys_t[idx]
                else:
                    idx = torch.randint(total, (n,), generator=self.rng).to(device)
                    yield xs_t[idx], ys_t[idx]
        loader_rng = torch.Generator().manual_seed(int(torch.randint(2**31, (1,),
                                                                     generator=self.rng)))
        loader = torch.utils.data.DataLoader(ds, batch_size=n, shuffle=True,
                                             drop_last=len(ds) >= n, generator=loader_rng)
        while True:
            for batch in loader:
                yield batch[0].to(device), batch[1].long().to(device)

    def train_gan(self, *, experience, device: torch.device | str = "cpu",
                  steps: int | None = None) -> dict[str, Any]:
        """Train G and D on the features of the frozen classifier ``self.teacher``.

        For the first GAN phase D's real batch is all real images of the experience; later, half
        are real new-class images and half old-class images of the previous generator. Returns
        (and appends to ``self.history``) a summary of the phase.
        """
        if self.teacher is None:
            raise RuntimeError("train_gan needs the trained classifier: call it from "
                               "after_training_exp (it sets plugin.teacher)")
        cfg = self.config
        device = torch.device(device)
        classifier = self.teacher.to(device)
        new = [int(c) for c in experience.classes_in_this_experience]
        old = [c for c in self.generated_classes if c not in new]
        x0 = experience.dataset[0][0]
        self.build_models(image_shape=tuple(x0.shape), num_classes=self._num_classes(experience),
                          classifier=classifier)
        G, G_ema, D = self.generator, self.generator_ema, self.discriminator
        assert G is not None and G_ema is not None and D is not None
        G.to(device).train()
        G_ema.to(device)
        D.to(device).train()
        for opt in (self.opt_g, self.opt_d):  # optimiser state follows the models' device
            for st in opt.state.values():  # type: ignore[union-attr]
                for k, v in st.items():
                    if torch.is_tensor(v) and k != "step":
                        st[k] = v.to(device)
        if self.generated_classes:
            # every phase starts from the EMA generator of the previous one (never re-initialised)
            G.load_state_dict(G_ema.state_dict())
        g_prev = _frozen_copy(G_ema) if old else None
        steps = (cfg.gan_steps if self.generated_classes else cfg.gan_steps_first) \
            if steps is None else steps
        batch = cfg.gan_batch_size
        n_old = batch // 2 if old else 0
        n_new = batch - n_old
        distill_w = cfg.g_distill_weight * len(old) / max(1, len(new))
        self.ada.reset()
        self.ada.to(device)
        acc = self._accelerator(device)
        tap = _FeatureTap(classifier, self.feature_layer)
        real_iter = self._real_batches(experience.dataset, n_new, device)
        sums = {"loss_d": 0.0, "loss_g": 0.0, "distill": 0.0, "r1": 0.0}
        t0 = time.perf_counter()

        def features(x: torch.Tensor) -> torch.Tensor:
            return tap(classifier, self.ada(x, generator=self.rng))

        def step_opt(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            if acc.scaler is not None:  # fp16: the scaler unscales, skips inf steps, updates
                acc.scaler.step(opt)
                acc.scaler.update()
            else:
                opt.step()

        bar = tqdm(range(steps), desc=f"Genifer GAN (classes {new})", disable=not cfg.progress,
                   leave=False)
        try:
            for step in bar:
                # 1. "real" batch: new-class images, plus old classes from the previous G
                x_real, y_real = next(real_iter)
                if old:
                    y_old = G.sample_labels(n_old, old, generator=self.rng).to(device)
                    x_old = g_prev.generate(n_old, y_old, generator=self.rng)  # type: ignore
                    x_real = torch.cat([x_real.to(x_old.dtype), x_old])
                    y_real = torch.cat([y_real, y_old])
                # 2. fake batch (same labels), kept with its graph: the classifier is frozen, so
                #    one pass through it serves both the D step (detached) and the G step
                z = torch.randn(batch, cfg.z_dim, generator=self.rng).to(device)
                noise = G.make_noise(batch, generator=self.rng, device=device)
                with acc.autocast():
                    fake = G(z, y_real, noise)
                    f_fake = features(fake)
                    with torch.no_grad():
                        f_real = features(x_real)
                # 3. discriminator step: softplus(D(fake)) + softplus(-D(real)) (+ lazy R1)
                do_r1 = cfg.r1_gamma > 0 and step % cfg.r1_interval == 0
                if do_r1:
                    f_real = f_real.detach().float().requires_grad_(True)
                with acc.autocast():
                    d_fake = D(f_fake.detach(), y_real)
                with nullcontext() if do_r1 else acc.autocast():
                    d_real = D(f_real, y_real)
                loss_d = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
                if do_r1:
                    (grad,) = torch.autograd.grad(d_real.float().sum(), f_real, create_graph=True)
                    r1 = grad.square().flatten(1).sum(1).mean()
                    loss_d = loss_d + r1 * (cfg.r1_gamma / 2) * cfg.r1_interval
                    sums["r1"] += float(r1.detach())
                self.ada.accumulate(d_real)
                step_opt(self.opt_d, loss_d)  # type: ignore[arg-type]
                # 4. generator step: fool the updated D through the frozen classifier, plus
                #    L1 self-distillation to the previous generator on old classes (same z, noise)
                D.requires_grad_(False)
                with acc.autocast():
                    loss_g = F.softplus(-D(f_fake, y_real)).mean()
                    if old:
                        with torch.no_grad():
                            prev = g_prev(z[n_new:], y_real[n_new:],  # type: ignore[misc]
                                          [t[n_new:] for t in noise])
                        distill = (fake[n_new:].float() - prev.float()).abs().mean()
                        loss_g = loss_g + distill_w * distill
                        sums["distill"] += float(distill.detach())
                step_opt(self.opt_g, loss_g)  # type: ignore[arg-type]
                D.requires_grad_(True)
                # 5. EMA of G (half-life ema_kimg thousand images, ramped up at the start)
                self.gan_nimg += batch
                ema_nimg = cfg.ema_kimg * 1000
                if cfg.ema_rampup:
                    ema_nimg = min(ema_nimg, self.gan_nimg * cfg.ema_rampup)
                beta = 0.5 ** (batch / max(ema_nimg, 1e-8))
                with torch.no_grad():
                    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                        p_ema.lerp_(p.detach(), 1 - beta)
                # 6. adapt the augmentation probability
                if (step + 1) % cfg.ada_interval == 0:
                    self.ada.adjust()
                sums["loss_d"] += float(loss_d.detach())
                sums["loss_g"] += float(loss_g.detach())
                if cfg.progress and step % 20 == 0:
                    bar.set_postfix(d=f"{loss_d.item():.3f}", g=f"{loss_g.item():.3f}",
                                    p=f"{float(self.ada.p):.2f}")
        finally:
            bar.close()
            tap.remove()
            real_iter.close()
        G.eval()
        self.generated_classes = sorted(set(self.generated_classes) | set(new))
        wall = time.perf_counter() - t0
        summary = {
            "experience": int(experience.current_experience), "new_classes": new,
            "old_classes": old, "steps": steps, "wall_s": wall,
            "steps_per_s": steps / wall if wall > 0 else math.inf,
            "ada_p": float(self.ada.p),
            **{k: v / max(1, steps) for k, v in sums.items()},
        }
        self.history.append(summary)
        return summary

    # ------------------------------------------------------------------ notebooks
    @torch.no_grad()
    def sample_grid(self, n_per_class: int = 8, classes: Sequence[int] | None = None, *,
                    seed: int = 0) -> torch.Tensor:
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
        return x.clamp(*self.config.output_range).cpu()


class Genifer(SupervisedTemplate):
    """Genifer strategy: ``SupervisedTemplate`` + :class:`GeniferPlugin` (``self.genifer``).

    Args:
        model: any classifier ``nn.Module`` (fixed single head or with an
            ``IncrementalClassifier`` head).
        optimizer: the classifier's optimiser.
        feature_layer: module name read by the discriminator and the feature distillation.
        criterion: classification loss on the real images.
        generator: optional :class:`StyleGenerator`; built from the data when omitted.
        config: :class:`GeniferConfig` (CPU ``split_digits`` defaults when omitted).
        train_mb_size, train_epochs, eval_mb_size, device, plugins, evaluator, eval_every,
            peval_mode: as for Avalanche's ``SupervisedTemplate``.
    """

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, feature_layer: str,
                 criterion: nn.Module | None = None, generator: StyleGenerator | None = None,
                 config: GeniferConfig | None = None, train_mb_size: int = 32,
                 train_epochs: int = 1, eval_mb_size: int = 256,
                 device: str | torch.device = "cpu", plugins: Sequence[Any] | None = None,
                 evaluator=default_evaluator, eval_every: int = -1, peval_mode: str = "epoch"):
        get_module(model, feature_layer)  # fail early with the list of valid names
        plugin = GeniferPlugin(feature_layer=feature_layer, config=config, generator=generator)
        super().__init__(
            model=model, optimizer=optimizer,
            criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
            train_mb_size=train_mb_size, train_epochs=train_epochs, eval_mb_size=eval_mb_size,
            device=device, plugins=[plugin, *(plugins or [])], evaluator=evaluator,
            eval_every=eval_every, peval_mode=peval_mode)
        self.genifer = plugin


def build_genifer(*, model, optimizer, criterion, benchmark, run, evaluator, device,
                  plugins=None) -> Genifer:
    """Registry factory (see :mod:`avalanche_d2l.registry`): Genifer with the benchmark's
    default config (:func:`default_config`), seeded by ``run.seed``; ``run.quick`` shortens it."""
    from avalanche_d2l.registry import benchmark_image_shape

    cfg = default_config(run.benchmark, quick=run.quick)
    _, h, _ = benchmark_image_shape(benchmark)
    num_classes = cfg.num_classes or int(benchmark.n_classes)
    if cfg.resolution is not None and cfg.resolution != h:
        warnings.warn(f"Genifer config resolution {cfg.resolution} != data size {h}; using {h}",
                      stacklevel=2)
    cfg = replace(cfg, seed=run.seed, num_classes=num_classes, resolution=h,
                  progress=cfg.progress and run.progress)
    return Genifer(model=model, optimizer=optimizer, criterion=criterion,
                   feature_layer=run.feature_layer, config=cfg,
                   train_mb_size=run.train_mb_size, train_epochs=run.epochs,
                   eval_mb_size=run.eval_mb_size, device=device, plugins=plugins,
                   evaluator=evaluator)
