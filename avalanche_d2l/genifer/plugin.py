"""Genifer's plugin: generative feature-driven image replay (Thandiackal et al., IVC 2024).

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
  + fd_weight*dist(f_student, f_teacher)`` (0.02 / 0.98 / 1.0 in the paper; ``dist`` per element
  by default, see :meth:`GeniferPlugin.feature_distance`).
* ``after_training_exp``: the teacher is frozen from the trained classifier and the GAN is
  trained on its features (skipped after the last experience of a stream whose length is known;
  set ``train_gan_after_last=True`` to always train). Part of the experience's real images is
  held out of it; the phase ends when the replay passes the fidelity check on them
  (:mod:`avalanche_d2l.genifer.monitor`), and the replay's fidelity figures go to the phase's
  summary (``history``), the evaluator's metrics and :meth:`GeniferPlugin.run_results`.

The :class:`GeniferConfig` defaults are the CPU preset of the 16 px offline streams; the authors'
CIFAR-100 setting is the ``genifer`` section of the ``genifer_cifar100`` experiment file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from avalanche_d2l.genifer.config import GeniferConfig
from avalanche_d2l.genifer.monitor import ReplayMonitor, publish_fidelity
from avalanche_d2l.genifer.parts import (
    build_generator,
    check_image_shape,
    crop_flip,
    mask_inactive,
    num_classes_of,
    output_linear,
    reinit_rows,
    value_range,
)
from avalanche_d2l.models.feature_gan import (
    FeatureGANTrainer,
    feature_shape,
    frozen_copy,
)
from avalanche_d2l.models.gan import (
    FeatureDiscriminator,
    StyleGenerator,
)
from avalanche_d2l.utils import FeatureHook, get_module, training_mode

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
    def fit_to_data(
        self,
        *,
        image_shape: Sequence[int],
        num_classes: int,
        classifier: nn.Module,
        value_range: tuple | None = None,
    ) -> None:
        """Build G (unless given; value range ``config.output_range``, else ``value_range``)
        for images of ``image_shape`` and D for the classifier's features; check that a given
        generator fits.

        Raises:
            ValueError: the shape cannot be served (with what to pass instead).
        """
        cfg = self.config
        c, h, w = check_image_shape(image_shape)
        self.image_shape = (c, h, w)
        if self.generator is None:
            out_range = cfg.output_range if cfg.output_range is not None else value_range
            self.gan.set_generator(build_generator(cfg, (c, h, w), num_classes, out_range))
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

    build_models = fit_to_data  # the name the benchmarks and notebooks use

    def _fit_to(self, experience, classifier: nn.Module) -> None:
        """:meth:`fit_to_data` with the shape, range and classes read from ``experience``."""
        shape = self.image_shape or tuple(experience.dataset[0][0].shape)
        vrange = None
        if self.generator is None and self.config.output_range is None:
            vrange = value_range(experience.dataset, int(shape[0]))
        self.fit_to_data(
            image_shape=shape,
            num_classes=num_classes_of(experience, self.config.num_classes),
            classifier=classifier,
            value_range=vrange,
        )

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of classes outside ``active_classes`` set to a large negative value
        (``head="fresh_per_task"``; identity otherwise or before any experience)."""
        if self.config.head != "fresh_per_task" or not self.active_classes:
            return logits
        return mask_inactive(logits, self.active_classes)

    # ------------------------------------------------------------------ Avalanche hooks
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
            xr = crop_flip(
                g.clamp(xr),  # type: ignore[union-attr]
                pad=cfg.replay_crop_pad,
                padding=cfg.replay_padding,
                flip=cfg.replay_flip,
                low=g.range_low,  # type: ignore[union-attr]
                rng=self.rng,
            ).to(x.dtype)
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
        fd = self.feature_distance(r["s_feat"], r["t_feat"])
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
        summary = self.train_gan(experience=exp, device=torch.device(strategy.device))
        # the replay's fidelity to the evaluator, whose after_training_exp (it runs after the
        # plugins) hands it to the loggers
        publish_fidelity(strategy, summary, origin=self)

    def run_results(self) -> dict[str, Any]:
        """What the experiment engine adds to this run's record in ``results.json``."""
        return {"replay_fidelity": self.fidelity_results()}

    def fidelity_results(self) -> list[dict[str, Any]]:
        """Per GAN phase: experience, classes, steps and the fidelity figures (for results)."""
        keys = ("experience", "new_classes", "steps", "max_steps", "wall_s", "fidelity")
        return [{k: h.get(k) for k in keys} for h in self.history]

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

    def feature_distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Mean over samples of the L2 distance of their flattened features.

        ``fd_distance="rms"``: divided by the square root of the number of feature values (a
        per-element root mean square), so the term's strength does not grow with the feature
        layer's size: a conv map and its global average pool give the same value for a change
        that is uniform over space. ``"norm"``: the reference's unnormalised norm (at its own
        layer, 256x8x8, it equals 128 x the "rms" value).
        """
        diff = (student.float() - teacher.float()).flatten(1)
        dist = diff.norm(dim=1)
        if self.config.fd_distance == "rms":
            dist = dist / math.sqrt(diff.shape[1])
        return dist.mean()

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
            self._fit_to(experience, classifier)
        if steps is None:
            steps = cfg.gan_steps if self.generated_classes else cfg.gan_steps_first
        exp_id = int(experience.current_experience)
        # 1. hold out real images of the experience to check the replay against
        dataset, monitor = experience.dataset, None
        if cfg.measure_fidelity or cfg.gan_stop == "fidelity":
            dataset, monitor = ReplayMonitor.for_phase(
                cfg,
                experience,
                generator=self.generator_ema,
                classifier=classifier,
                classes=new,
                active=self.seen_classes,
                device=device,
            )
        # 2. the GAN phase, ended by the monitor once every class's replay is good
        stop = monitor is not None and cfg.gan_stop == "fidelity"
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
            monitor_every=cfg.fidelity_every,
        )
        self.generated_classes = sorted(set(self.generated_classes) | set(new))
        # 3. every fidelity figure of the final replay, while the real images are at hand
        if monitor is not None:
            monitor.replay_classes = list(self.generated_classes)
            summary["fidelity"] = monitor.finish(summary, self.feature_layer)
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
