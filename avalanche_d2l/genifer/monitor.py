"""The replay check of a GAN phase: real images held out, a stop rule, the final fidelity.

:class:`ReplayMonitor` is built by the plugin after an experience, while its real images are at
hand. It splits them into the part the GAN trains on and a held-out part, is called by the GAN
trainer every ``every`` steps (train-on-replay-test-on-real accuracy per class, see
:mod:`avalanche_d2l.genifer.fidelity`), says when to stop, and measures every fidelity figure at
the end of the phase.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from avalanche.evaluation.metric_results import MetricValue
from torch import nn

from avalanche_d2l.genifer.config import GanSettings
from avalanche_d2l.genifer.fidelity import (
    ProbeSettings,
    measure_fidelity,
    probe_accuracy,
    replay_pool,
    replay_separability,
)
from avalanche_d2l.models.feature_gan_parts import FeatureTap

__all__ = ["ReplayMonitor", "StopRule", "phase_seeds", "publish_fidelity", "split_holdout"]


def phase_seeds(seed: int, experience: int) -> tuple[int, int]:
    """``(split, probes)``: the seeds of the held-out split and of the monitor's own draws in the
    GAN phase after ``experience`` of a run seeded ``seed`` (what :meth:`ReplayMonitor.for_phase`
    uses; a measurement that must see the same split and probes calls this)."""
    base = seed * 7919 + experience
    return base, base + 1


@dataclass(frozen=True)
class StopRule:
    """When a GAN phase may end (``min_steps`` <= steps <= the phase's cap).

    Attributes:
        threshold: every class's train-on-replay-test-on-real accuracy must reach this.
        min_delta: the mean accuracy "stops improving" when it gains less than this over the
            best earlier check.
        min_steps: no stop before this many steps (the floor).
        window: the checks are judged on each class's accuracy averaged over the last this
            many checks (1: the latest check alone), so that one lucky probe cannot end a phase.
        max_separability: (``None``: not asked) every check also measures how well a probe
            tells the replay from real images; the phase may end only when that figure,
            averaged over the same window, is at most this.
    """

    threshold: float = 0.85
    min_delta: float = 0.01
    min_steps: int = 100
    window: int = 1
    max_separability: float | None = None


def _load(ds, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sub = torch.utils.data.Subset(ds, indices.tolist())
    xs, ys = [], []
    for x, y, *_ in torch.utils.data.DataLoader(sub, batch_size=512, shuffle=False):
        xs.append(x.float())
        ys.append(torch.as_tensor(y).long())
    return torch.cat(xs), torch.cat(ys)


def split_holdout(dataset, fraction: float, rng: torch.Generator, *, max_test: int = 512):
    """Split an experience's dataset for a GAN phase.

    Returns ``(gan_dataset, real_train, real_test)``: the dataset the GAN trains on (without
    the held-out images), up to 2048 of its images as tensors (for the probes), and the
    held-out images as tensors (``fraction`` of the data, at most ``max_test``).
    """
    n = len(dataset)
    perm = torch.randperm(n, generator=rng)
    n_test = min(max_test, max(2, int(round(fraction * n))))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    ds = dataset.eval() if hasattr(dataset, "eval") else dataset
    gan_dataset = dataset.subset(train_idx.tolist()) if hasattr(dataset, "subset") else None
    if gan_dataset is None:
        gan_dataset = torch.utils.data.Subset(dataset, train_idx.tolist())
    return gan_dataset, _load(ds, train_idx[:2048]), _load(ds, test_idx)


class ReplayMonitor:
    """Checks the EMA generator's replay of an experience's classes against held-out real images.

    Args:
        generator: the EMA generator (``generate`` and ``clamp``), read at every call.
        classifier: the frozen classifier the GAN trains against.
        features: images -> the classifier's features at the feature layer.
        classes: the experience's classes; replay_classes: all classes the generator makes.
        active: the classes the classifier may predict.
        real_train, real_test: from :func:`split_holdout`.
        rule: the stop rule; settings: probe sizes (``check_steps`` probe steps per check).
        seed: seeds the monitor's own generator (training draws are left untouched).
    """

    def __init__(
        self,
        *,
        generator,
        classifier: nn.Module,
        features,
        classes: Sequence[int],
        replay_classes: Sequence[int],
        active: Sequence[int],
        real_train: tuple[torch.Tensor, torch.Tensor],
        real_test: tuple[torch.Tensor, torch.Tensor],
        rule: StopRule,
        settings: ProbeSettings,
        seed: int,
        keep_best: bool = False,
    ):
        self.generator = generator
        self.classifier = classifier
        self.features = features
        self.classes = [int(c) for c in classes]
        self.replay_classes = [int(c) for c in replay_classes]
        self.active = [int(c) for c in active]
        self.real_train = real_train
        self.real_test = real_test
        self.rule = rule
        self.settings = settings
        self.rng = torch.Generator().manual_seed(seed)
        self.trace: list[dict] = []  # one entry per check: step and per-class accuracy
        self.best = -math.inf
        self.keep_best = keep_best
        self.best_check: tuple[float, int, dict] | None = None  # (worst class, step, G_ema)

    @classmethod
    def for_phase(
        cls,
        settings: GanSettings,
        experience,
        *,
        generator,
        classifier: nn.Module,
        classes: Sequence[int],
        active: Sequence[int],
        device: torch.device,
        seed: int,
    ):
        """The GAN's dataset (the held-out images removed) and the monitor of the phase after
        ``experience``, with the stop rule and probe settings of the GAN ``settings``."""
        split_seed, probe_seed = phase_seeds(seed, int(experience.current_experience))
        rng = torch.Generator().manual_seed(split_seed)
        dataset, real_train, real_test = split_holdout(experience.dataset, settings.holdout, rng)
        monitor = cls(
            generator=generator,
            classifier=classifier,
            features=None,
            classes=classes,
            replay_classes=classes,
            active=active,
            real_train=(real_train[0].to(device), real_train[1].to(device)),
            real_test=(real_test[0].to(device), real_test[1].to(device)),
            rule=StopRule(
                settings.threshold,
                settings.min_delta,
                settings.min_steps,
                settings.stop_window,
                settings.max_separability,
            ),
            settings=ProbeSettings(steps=settings.probe_steps, pool=settings.probe_pool),
            seed=probe_seed,
            keep_best=settings.keep_best,
        )
        return dataset, monitor

    def sample(self, labels: torch.Tensor) -> torch.Tensor:
        g = self.generator
        return g.clamp(g.generate(len(labels), labels, generator=self.rng))

    def __call__(self, step: int) -> bool:
        """Check the replay after ``step`` GAN steps; True when the phase may end."""
        if step < self.rule.min_steps:
            return False
        t0 = time.perf_counter()
        device = self.real_test[0].device
        rx, ry = replay_pool(self.sample, self.classes, self.settings.n_per_class, device)
        acc = probe_accuracy(rx, ry, *self.real_test, self.classes, self.settings, self.rng)
        check: dict[str, Any] = {"step": int(step), "probe": {str(c): a for c, a in acc.items()}}
        if self.rule.max_separability is not None:  # replay against real, on held-out images
            check["separability"] = replay_separability(
                self.sample,
                rx,
                self.real_train,
                self.real_test,
                self.classes,
                self.settings,
                self.rng,
            )
        check["wall_s"] = time.perf_counter() - t0
        self.trace.append(check)
        latest_worst = min(acc.values())
        if self.keep_best and (self.best_check is None or latest_worst > self.best_check[0]):
            state = {k: v.detach().clone() for k, v in self.generator.state_dict().items()}
            self.best_check = (latest_worst, int(step), state)
        # the rule judges each class's mean over the last ``window`` checks of this phase
        last = self.trace[-self.rule.window :]
        judged = [sum(t["probe"][str(c)] for t in last) / len(last) for c in acc]
        mean, worst = sum(judged) / len(judged), min(judged)
        passed = worst >= self.rule.threshold
        if self.rule.max_separability is not None:
            sep = sum(t["separability"] for t in last) / len(last)
            passed = passed and sep <= self.rule.max_separability
        improving = mean > self.best + self.rule.min_delta
        self.best = max(self.best, mean)
        return passed and not improving

    def restore_best(self, summary: dict[str, Any]) -> None:
        """With ``keep_best``, after a phase that ended at its cap: the EMA generator as it was
        at the check whose worst class scored highest, when that was not the last check
        (``summary["kept_check"]`` names its step)."""
        if not self.keep_best or self.best_check is None or summary["steps"] < summary["max_steps"]:
            return
        _, step, state = self.best_check
        if self.trace and step != self.trace[-1]["step"]:
            self.generator.load_state_dict(state)
            summary["kept_check"] = step

    def measure(self):
        """Every fidelity figure of the replay as it is now."""
        return measure_fidelity(
            sample=self.sample,
            classifier=self.classifier,
            features=self.features,
            real_train=self.real_train,
            real_test=self.real_test,
            classes=self.classes,
            replay_classes=self.replay_classes,
            active=self.active,
            settings=self.settings,
            rng=self.rng,
        )

    def finish(self, summary: dict[str, Any], feature_layer: str) -> dict[str, Any]:
        """Every fidelity figure of the phase's final replay (features read at
        ``feature_layer``), with the checks made during the phase; a warning names the classes
        whose replay stays below the threshold."""

        def features(x: torch.Tensor) -> torch.Tensor:
            tap = FeatureTap(self.classifier, feature_layer)
            try:
                return tap(self.classifier, x)
            finally:
                tap.remove()

        self.features = features
        t0 = time.perf_counter()
        fid = self.measure().as_dict()
        self.features = None
        fid["wall_s"] = time.perf_counter() - t0
        fid["checks"] = self.trace
        thr = self.rule.threshold
        low = [int(c) for c, a in fid["probe"].items() if a < thr]
        fid["below_threshold"] = low
        if low:
            warnings.warn(
                f"Genifer: after {summary['steps']} GAN steps (cap {summary['max_steps']}), the "
                f"replay of classes {low} is recognised by a probe trained on it at "
                f"{[round(fid['probe'][str(c)], 3) for c in low]} on held-out real images "
                f"(threshold {thr}): those classes may be forgotten. Raise gan.steps / "
                "gan.steps_first, or see the README's Genifer section.",
                stacklevel=4,
            )
        return fid


def publish_fidelity(strategy, summary: dict[str, Any], *, origin) -> None:
    """A GAN phase's fidelity figures as Avalanche metric values of ``strategy.evaluator``
    (named ``ReplayFidelity/<figure>/Exp<k>``, per class ``.../Class<c>``)."""
    fid = summary.get("fidelity")
    evaluator = getattr(strategy, "evaluator", None)
    if fid is None or evaluator is None:
        return
    x = strategy.clock.train_iterations
    exp = f"Exp{summary['experience']:03d}"
    values = {
        f"ReplayFidelity/probe_min/{exp}": fid["probe_min"],
        f"ReplayFidelity/classifier_mean/{exp}": fid["classifier_mean"],
        f"ReplayFidelity/diversity_mean/{exp}": fid["diversity_mean"],
        f"ReplayFidelity/separability/{exp}": fid["separability"],
        f"ReplayFidelity/gan_steps/{exp}": float(summary["steps"]),
    }
    for c, acc in fid["probe"].items():
        values[f"ReplayFidelity/probe/{exp}/Class{int(c):03d}"] = acc
    for name, value in values.items():
        evaluator.publish_metric_value(MetricValue(origin, name, float(value), x))
