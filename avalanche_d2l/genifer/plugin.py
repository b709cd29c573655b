"""Genifer's plugin: generative feature-driven image replay (Thandiackal et al., IVC 2024).

Data-free class-incremental learning: no real image of a past experience is kept. The hooks
below, in the order they run, are the paper's loop:

1. **Before an experience** (``before_training_exp``): at the first one, the image shape, value
   range and number of classes are read from the data and the generator G and the discriminator D
   are built. With ``head="fresh_per_task"`` the output rows of classes new to the model are
   re-initialised.
2. **Training with replay and distillation** (t >= 1): ``before_forward`` joins images of old
   classes from the frozen EMA generator to the mini-batch (tensors per batch) and computes the
   frozen teacher's logits and features on them; ``after_forward`` splits the replayed part off
   (the criterion and the training metrics see only real images); ``before_backward`` forms
   ``ce_weight*CE(real) + kd_weight*KD(replayed, old classes) + fd_weight*dist(f_student,
   f_teacher)`` (:mod:`avalanche_d2l.genifer.losses`; 0.02 / 0.98 / 1.0 in the paper)
   ``+ kd_real*KD(real, old classes)``, the teacher in eval mode on the real images (0.3 by
   default, 0 in the paper experiment files). The reference code's ``"onlycurr"`` alternative
   (``replay.fd_on="real"``, ``replay.trunk_from_replay=False``) distils the real images'
   features instead and keeps the replay out of the layers up to the feature layer.
3. **After an experience** (``after_training_exp``): the teacher is a frozen copy of the trained
   classifier; the GAN phase trains G so that D, reading the teacher's *features* (never pixels),
   cannot tell its images from the experience's (:mod:`avalanche_d2l.models.feature_gan`); it
   ends when held-out real images say the replay is good (:mod:`avalanche_d2l.genifer.monitor`),
   and the replay's fidelity goes to the phase's summary (``history``), the evaluator's metrics
   and :meth:`GeniferPlugin.run_results`. Skipped after the last experience of a stream whose
   length is known (``gan.after_last=True`` to always train).

The whole method lives in :class:`GeniferPlugin`; :class:`Genifer` is ``SupervisedTemplate`` with
that plugin, so ``Naive(model=..., optimizer=..., plugins=[GeniferPlugin(...)])`` is the same
algorithm. The :class:`GeniferConfig` defaults are the CPU preset of the 16 px offline streams;
the authors' CIFAR-100 setting is the ``genifer`` section of the ``genifer_cifar100`` experiment.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from avalanche_d2l.genifer import losses
from avalanche_d2l.genifer.config import GeniferConfig
from avalanche_d2l.genifer.monitor import ReplayMonitor, publish_fidelity
from avalanche_d2l.genifer.parts import (
    fit_gan,
    mask_inactive,
    num_classes_of,
    output_linear,
    reinit_rows,
    value_range,
)
from avalanche_d2l.genifer.replay import (
    ReplayDetach,
    join_batch,
    replay_sizes,
    sample_replay,
    teacher_outputs,
)
from avalanche_d2l.genifer.state import load_plugin_state, plugin_state
from avalanche_d2l.models.feature_gan import FeatureGANTrainer
from avalanche_d2l.models.feature_gan_parts import channels_last_on_cpu, device_layout, frozen_copy
from avalanche_d2l.models.gan import FeatureDiscriminator, StyleGenerator
from avalanche_d2l.utils import FeatureHook, get_module

__all__ = ["GeniferPlugin"]


def _is_last_experience(experience) -> bool:
    """True when the stream's length is known and ``experience`` is its last one."""
    try:
        return experience.current_experience == len(experience.origin_stream) - 1
    except (AttributeError, TypeError, NotImplementedError):
        return False


class GeniferPlugin(SupervisedPlugin, supports_distributed=True):
    """All of Genifer's state and logic (see the module docstring for the schedule).

    Args:
        feature_layer: module name (``model.named_modules()``) whose output the discriminator
            reads and the feature distillation compares, e.g. ``"layer3"`` or ``"block3"``.
        config: settings; defaults to :class:`GeniferConfig` ().
        generator: a :class:`StyleGenerator` to use; built to fit the data when omitted.
        image_shape: ``(C, H, W)`` of the classifier's input; read from the first experience
            when omitted.
        checkpoint_dir: folder for mid-phase GAN checkpoints (``config.gan.checkpoint_every``).
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
        cfg = self.config
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.gan = FeatureGANTrainer(
            gan=cfg.gan,
            discriminator=cfg.discriminator,
            augment=cfg.augment,
            rng=self.rng,
            progress=cfg.progress,
        )
        if generator is not None:
            self.gan.set_generator(generator)
        self.teacher: nn.Module | None = None
        self.seen_classes: list[int] = []  # classes the teacher was trained on
        self.generated_classes: list[int] = []  # classes the generator was trained on
        self.active_classes: list[int] = []  # classes the model may predict now (fresh head)
        # transient, per-iteration state (never pickled)
        self._hook: FeatureHook | None = None
        self._detach: ReplayDetach | None = None
        self._replay: dict[str, Any] | None = None
        self._replay_classes: list[int] = []
        self._domain: losses.DomainConfusion | None = None  # per experience (replay.domain_weight)

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

    # ------------------------------------------------------------------ 1. before an experience
    def before_training(self, strategy, **kwargs) -> None:
        get_module(strategy.model, self.feature_layer)  # clear error for a wrong name

    def before_training_exp(self, strategy, **kwargs) -> None:
        if self.generator is None or self.discriminator is None:
            self._fit_to(strategy.experience, strategy.model)  # before any training
        current = [int(c) for c in strategy.experience.classes_in_this_experience]
        if self.config.head == "fresh_per_task" and self.seen_classes:
            head = output_linear(strategy.model, self.config.head_module)
            reinit_rows(head, [c for c in current if c not in self.seen_classes], self.rng)
        self.active_classes = sorted(set(self.seen_classes) | set(current))
        ready = self.teacher is not None and self.generated_classes
        self._replay_classes = list(self.generated_classes) if ready else []
        if ready:
            self._teacher_to(strategy.device)
            device_layout(self.generator_ema, strategy.device)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ 2. training with replay
    def before_forward(self, strategy, **kwargs) -> None:
        if not strategy.is_training or not self._replay_classes:
            return
        settings = self.config.replay
        n, n_real = replay_sizes(strategy.mbatch[0].shape[0], settings)
        mb = [t[:n_real] for t in strategy.mbatch]
        # 1. old-class images from the frozen EMA generator, generated as one tensor
        g = self.generator_ema
        xr, labels = sample_replay(g, self._replay_classes, n, settings, self.rng)  # type: ignore
        xr = xr.to(mb[0].dtype)
        # 2. the teacher's logits and features on them (train mode: on the mixed batch)
        fd_real = settings.fd_on == "real"
        t_logits, t_feat, t_feat_real = teacher_outputs(
            self.teacher,  # type: ignore[arg-type]
            self.feature_layer,
            mb[0],
            xr,
            settings.teacher_bn,
            real_features=fd_real,
        )
        # 3. join them to the mini-batch and watch the student's features
        strategy.mbatch = join_batch(mb, xr, labels)
        self._replay = {
            "n_real": n_real,
            "t_logits": t_logits,
            "t_feat": t_feat_real if fd_real else t_feat,
        }
        if settings.kd_real > 0:  # the teacher's answers on the real images too (eval mode)
            with torch.no_grad():
                self._replay["t_real"] = self.teacher(mb[0])  # type: ignore[misc]
        if not settings.trunk_from_replay:  # registered first: the feature hook sees its output
            self._detach = ReplayDetach(strategy.model, self.feature_layer, n_real)
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
            self._remove_detach()
        n = self._replay["n_real"]
        self._replay["s_logits"] = out[n:]
        self._replay["s_feat"] = feats[:n] if self.config.replay.fd_on == "real" else feats[n:]
        if self.config.replay.domain_weight > 0:
            self._replay["s_feat_all"] = feats
        # the criterion and the training metrics see the real images only
        strategy.mb_output = out[:n]
        strategy.mbatch = [t[:n] for t in strategy.mbatch]

    def before_backward(self, strategy, **kwargs) -> None:
        if self._replay is None:
            return
        r, self._replay = self._replay, None
        w = self.config.replay
        ce = strategy.criterion()  # already in strategy.loss with weight 1
        kd = self.kd_loss(r["s_logits"], r["t_logits"])
        fd = self.feature_distance(r["s_feat"], r["t_feat"])
        if w.ce_classes == "current":  # the criterion over this experience's classes only
            logits = strategy.mb_output
            current = [int(c) for c in strategy.experience.classes_in_this_experience]
            strategy.mb_output = mask_inactive(logits, current)
            try:
                ce_current = strategy.criterion()
            finally:
                strategy.mb_output = logits
            strategy.loss = strategy.loss - ce + w.ce_weight * ce_current
        else:
            strategy.loss = strategy.loss + (w.ce_weight - 1.0) * ce
        strategy.loss = strategy.loss + w.kd_weight * kd + w.fd_weight * fd
        if w.kd_real > 0:  # strategy.mb_output holds the real images' (masked) logits
            kd_real = self.kd_loss(strategy.mb_output, r["t_real"], w.kd_real_softmax)
            strategy.loss = strategy.loss + w.kd_real * kd_real
        if w.domain_weight > 0:
            feats = r["s_feat_all"]
            if self._domain is None:
                self._domain = losses.DomainConfusion(feats.shape[1], w.domain_lr, feats.device)
            strategy.loss = strategy.loss + w.domain_weight * self._domain.loss(
                feats, n_real=r["n_real"]
            )

    def after_backward(self, strategy, **kwargs) -> None:
        if self._domain is not None:  # only while training with replay
            self._domain.step()

    def _remove_detach(self) -> None:
        if self._detach is not None:
            self._detach.remove()
            self._detach = None

    def kd_loss(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_softmax: str = "all",
    ) -> torch.Tensor:
        """:func:`~avalanche_d2l.genifer.losses.kd_loss` over the classes seen so far (the
        student's softmax over all outputs, or over those classes with ``"old"``)."""
        temperature = self.config.replay.kd_temperature
        return losses.kd_loss(
            student_logits, teacher_logits, self.seen_classes, temperature, student_softmax
        )

    def feature_distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """:func:`~avalanche_d2l.genifer.losses.feature_distance` (``replay.fd_distance``)."""
        return losses.feature_distance(student, teacher, self.config.replay.fd_distance)

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of classes outside ``active_classes`` set to a large negative value
        (``head="fresh_per_task"``; identity otherwise or before any experience)."""
        if self.config.head != "fresh_per_task" or not self.active_classes:
            return logits
        return mask_inactive(logits, self.active_classes)

    def after_eval_forward(self, strategy, **kwargs) -> None:
        strategy.mb_output = self.mask_logits(strategy.mb_output)

    # ------------------------------------------------------------------ 3. after an experience
    def after_training_exp(self, strategy, **kwargs) -> None:
        if self._hook is not None:  # an interrupted iteration must not leave a hook behind
            self._hook.remove()
            self._hook = None
        self._remove_detach()
        self._replay = None
        self._domain = None
        exp = strategy.experience
        new = [int(c) for c in exp.classes_in_this_experience]
        self.seen_classes = sorted(set(self.seen_classes) | set(new))
        self.active_classes = list(self.seen_classes)
        # 1. C_t: frozen copy of the classifier; teacher of the next experience and D's features
        self.freeze_teacher(strategy.model)
        if _is_last_experience(exp) and not self.config.gan.after_last:
            return  # no later experience will replay (set gan.after_last to override)
        # 2. the GAN phase on C_t's features, with the replay's fidelity at its end
        summary = self.train_gan(experience=exp, device=torch.device(strategy.device))
        # 3. the fidelity to the evaluator, whose after_training_exp (after the plugins') hands
        #    it to the loggers
        publish_fidelity(strategy, summary, origin=self)

    def freeze_teacher(self, model: nn.Module, state: dict | None = None) -> nn.Module:
        """``self.teacher``: a frozen copy of ``model`` (eval mode, no gradients) holding
        ``state`` when given (a saved teacher's ``state_dict``), on CPU in channels-last memory
        format where that gives the same outputs (faster there)."""
        teacher = frozen_copy(model)
        if state is not None:
            teacher.load_state_dict(state)
        self.teacher = channels_last_on_cpu(teacher, self._example())
        return self.teacher

    def _teacher_to(self, device) -> nn.Module:
        """The teacher on ``device``; off the CPU in the default layout (channels-last was
        measured on CPU only, and a run resumed from a CPU checkpoint must not carry it)."""
        teacher = self.teacher.to(device)  # type: ignore[union-attr]
        # on the CPU the layout freeze_teacher checked; elsewhere device_layout's default one
        return teacher if torch.device(device).type == "cpu" else device_layout(teacher)

    def _example(self) -> torch.Tensor | None:
        """A fixed batch of the images the classifier takes (to check a layout change on)."""
        if not self.image_shape:
            return None
        rng = torch.Generator().manual_seed(0)
        return torch.rand(4, *self.image_shape, generator=rng)

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
        gan = self.config.gan
        device = torch.device(device)
        classifier = self._teacher_to(device)
        new = [int(c) for c in experience.classes_in_this_experience]
        old = [c for c in self.generated_classes if c not in new]
        if self.generator is None or self.discriminator is None:
            self._fit_to(experience, classifier)
        if steps is None:
            steps = gan.steps if self.generated_classes else gan.steps_first
        exp_id = int(experience.current_experience)
        # 1. hold out real images of the experience to check the replay against
        dataset, monitor = experience.dataset, None
        if gan.measure_fidelity or gan.stop == "fidelity":
            dataset, monitor = ReplayMonitor.for_phase(
                gan,
                experience,
                generator=self.generator_ema,
                classifier=classifier,
                classes=new,
                active=self.seen_classes,
                device=device,
                seed=self.config.seed,
            )
        # 2. the GAN phase, ended by the monitor once every class's replay is good
        stop = monitor is not None and gan.stop == "fidelity"
        summary = self.gan.train_phase(
            classifier=classifier,
            feature_layer=self.feature_layer,
            dataset=dataset,
            new_classes=new,
            old_classes=old,
            steps=steps,
            device=device,
            experience=exp_id,
            checkpoint_path=self.gan_checkpoint_path(exp_id),
            monitor=monitor if stop else None,
            monitor_every=gan.check_every,
        )
        self.generated_classes = sorted(set(self.generated_classes) | set(new))
        # 3. every fidelity figure of the final replay, while the real images are at hand
        if monitor is not None:
            monitor.restore_best(summary)
            monitor.replay_classes = list(self.generated_classes)
            summary["fidelity"] = monitor.finish(summary, self.feature_layer)
        return summary

    # ------------------------------------------------------------------ results and state
    def run_results(self) -> dict[str, Any]:
        """What the experiment engine adds to this run's record in ``results.json``."""
        return {"replay_fidelity": self.fidelity_results()}

    def fidelity_results(self) -> list[dict[str, Any]]:
        """Per GAN phase: experience, classes, steps and the fidelity figures (for results);
        with ``gan.keep_best``, the step of the check whose generator was kept."""
        keys = ("experience", "new_classes", "steps", "max_steps", "wall_s", "fidelity")
        return [
            {k: h.get(k) for k in keys}
            | ({"kept_check": h["kept_check"]} if "kept_check" in h else {})
            for h in self.history
        ]

    def gan_checkpoint_path(self, experience: int) -> Path | None:
        """Where the mid-phase checkpoint of the GAN phase after ``experience`` is written."""
        if self.checkpoint_dir is None or not self.config.gan.checkpoint_every:
            return None
        return Path(self.checkpoint_dir) / f"genifer_gan_after_exp{experience:03d}.pt"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_detach"] = None
        state["_hook"] = None  # hook handles and per-batch tensors are not part of the state
        state["_replay"] = None
        return state

    def state_dict(self) -> dict[str, Any]:
        """GAN trainer state, teacher, classes, image shape, RNG."""
        return plugin_state(self)

    def load_state_dict(self, state: dict[str, Any], *, model: nn.Module | None = None) -> None:
        """Restore :meth:`state_dict`. ``model`` (the classifier) is needed to rebuild the teacher
        when this plugin has none yet."""
        load_plugin_state(self, state, model=model)

    def fit_to_data(
        self,
        *,
        image_shape: Sequence[int],
        num_classes: int,
        classifier: nn.Module,
        value_range: tuple | None = None,
    ) -> None:
        """Build G and D for images of ``image_shape`` (see :func:`~.parts.fit_gan`)."""
        self.image_shape = fit_gan(
            self.gan,
            self.config,
            feature_layer=self.feature_layer,
            image_shape=image_shape,
            num_classes=num_classes,
            classifier=classifier,
            value_range=value_range,
        )

    build_models = fit_to_data  # the name the benchmarks and notebooks use

    def _fit_to(self, experience, classifier: nn.Module) -> None:
        """:meth:`fit_to_data` with the shape, range and classes read from ``experience``."""
        shape = self.image_shape or tuple(experience.dataset[0][0].shape)
        vrange = None
        if self.generator is None and self.config.generator.output_range is None:
            vrange = value_range(experience.dataset, int(shape[0]))
        self.fit_to_data(
            image_shape=shape,
            num_classes=num_classes_of(experience, self.config.num_classes),
            classifier=classifier,
            value_range=vrange,
        )

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
