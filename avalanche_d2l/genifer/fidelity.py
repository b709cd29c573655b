"""Replay fidelity: how well a generator's images stand in for the real images of their classes.

Genifer's classifier only ever sees old classes through the generator, and the generator was
trained to satisfy one discriminator on one frozen classifier's features, which it can fool
(textured noise the classifier recognises). These measurements test the replay against *real*
images instead, while an experience's real images are still at hand:

* ``probe`` (train on replay, test on real): a small probe CNN trained only on replay of the
  experience's classes, scored per class on real images it never saw;
* ``probe_real``: the same probe trained on real images instead (the ceiling of ``probe`` for
  this probe and this data);
* ``classifier``: the frozen classifier's accuracy on the replay, per class;
* ``diversity``: within-class spread of the classifier's features of the replay over that of the
  real images (1 = as varied as the real data, near 0 = one image per class);
* ``separability``: balanced accuracy of a probe telling replay from real images of the same
  classes, on images it was not trained on (0.5 = indistinguishable, 1 = always told apart).

Every function takes tensors and a seeded CPU generator; nothing here knows the plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from avalanche_d2l.models.feature_gan_parts import channels_last_on_cpu
from avalanche_d2l.models.heads import pool_features

__all__ = [
    "Fidelity",
    "ProbeSettings",
    "classifier_accuracy",
    "diversity_ratio",
    "measure_fidelity",
    "probe_accuracy",
    "replay_separability",
    "separability",
]

#: ``sample(n, labels) -> images``: the generator being measured (no gradients needed).
Sampler = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ProbeSettings:
    """Size and training of the probes.

    Attributes:
        steps: Adam steps of each probe.
        batch_size: images per probe step.
        n_per_class: replay images generated per class for a probe's training pool.
        width: channels of the probe's first conv (the second has twice as many).
        lr: Adam learning rate.
        pool: the probe's head sees its feature map average-pooled to ``pool x pool`` cells
            (1: global average pooling, the probe of earlier versions, which discards where the
            strokes are and, trained on *real* images, often missed the stop's threshold
            itself; measured by ``benchmarks/genifer_probe_ceiling.py``).
    """

    steps: int = 120
    batch_size: int = 64
    n_per_class: int = 128
    width: int = 16
    lr: float = 3e-3
    pool: int = 4


def _probe(channels: int, n_out: int, width: int, pool: int) -> nn.Module:
    """Two conv blocks, average pooling to ``pool x pool`` cells and a linear layer: small enough
    to train in a second on CPU, independent of the classifier the generator was trained
    against.

    Group norm, not batch norm: batch-norm statistics gathered on replay and applied to real
    images made the probe answer one class for every real image (a domain shift of the
    statistics, not of the classes)."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.GroupNorm(4, width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.GroupNorm(4, 2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(pool),
        nn.Flatten(),
        nn.Linear(2 * width * pool * pool, n_out),
    )


def _train_probe(
    x: torch.Tensor, y: torch.Tensor, n_out: int, settings: ProbeSettings, rng: torch.Generator
) -> nn.Module:
    """A probe trained with cross-entropy on ``(x, y)`` (``y`` in ``0..n_out-1``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=rng)))
        probe = channels_last_on_cpu(
            _probe(x.shape[1], n_out, settings.width, settings.pool).to(x.device)
        )
    opt = torch.optim.Adam(probe.parameters(), lr=settings.lr)
    probe.train()
    for _ in range(settings.steps):
        idx = torch.randint(len(y), (min(settings.batch_size, len(y)),), generator=rng)
        idx = idx.to(x.device)
        loss = F.cross_entropy(probe(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return probe.eval()


@torch.no_grad()
def _per_class_accuracy(
    pred: torch.Tensor, y: torch.Tensor, classes: Sequence[int]
) -> dict[int, float]:
    return {
        int(c): float((pred[y == i] == i).float().mean()) if bool((y == i).any()) else float("nan")
        for i, c in enumerate(classes)
    }


def _index_labels(y: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Labels as positions in ``classes``."""
    lut = torch.full((max(classes) + 1,), -1, dtype=torch.long, device=y.device)
    lut[torch.as_tensor(list(classes), device=y.device)] = torch.arange(len(classes)).to(y.device)
    return lut[y.long()]


@torch.no_grad()
def replay_pool(
    sample: Sampler, classes: Sequence[int], n_per_class: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` replay images of each class, generated in chunks of 256."""
    labels = torch.as_tensor(list(classes)).repeat_interleave(n_per_class).to(device)
    xs = [sample(labels[i : i + 256]) for i in range(0, len(labels), 256)]
    return torch.cat(xs).float(), labels


def probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    classes: Sequence[int],
    settings: ProbeSettings,
    rng: torch.Generator,
) -> dict[int, float]:
    """Per-class accuracy on ``(test_x, test_y)`` of a probe trained on ``(train_x, train_y)``
    over ``classes`` (labels are class ids)."""
    probe = _train_probe(train_x, _index_labels(train_y, classes), len(classes), settings, rng)
    with torch.no_grad():
        pred = torch.cat([probe(test_x[i : i + 512]).argmax(1) for i in range(0, len(test_x), 512)])
    return _per_class_accuracy(pred, _index_labels(test_y, classes), classes)


@torch.no_grad()
def classifier_accuracy(
    classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, active: Sequence[int]
) -> dict[int, float]:
    """Per-class accuracy of ``classifier`` on ``(x, y)``, its argmax taken over ``active``."""
    logits = torch.cat([classifier(x[i : i + 256]) for i in range(0, len(x), 256)])
    act = torch.as_tensor(list(active), device=logits.device)
    pred = act[logits.index_select(1, act).argmax(1)]
    return {int(c): float((pred[y == c] == c).float().mean()) for c in torch.unique(y).tolist()}


@torch.no_grad()
def diversity_ratio(
    feats_replay: torch.Tensor, y_replay: torch.Tensor, feats_real: torch.Tensor, y_real
) -> dict[int, float]:
    """Per class: mean squared distance of the replay's features to their class mean over the
    same figure for the real images (feature maps are averaged over space first)."""

    def spread(f: torch.Tensor) -> float:
        f = pool_features(f.float())
        return float((f - f.mean(0)).square().sum(1).mean())

    out = {}
    for c in torch.unique(y_real).tolist():
        real = spread(feats_real[y_real == c])
        out[int(c)] = spread(feats_replay[y_replay == c]) / max(real, 1e-12)
    return out


def separability(
    replay_train: torch.Tensor,
    real_train: torch.Tensor,
    replay_test: torch.Tensor,
    real_test: torch.Tensor,
    settings: ProbeSettings,
    rng: torch.Generator,
) -> float:
    """Balanced accuracy of a probe trained to tell replay (1) from real (0) images, on images
    it did not train on; 0.5 = indistinguishable."""
    x = torch.cat([replay_train, real_train])
    y = torch.cat([torch.ones(len(replay_train)), torch.zeros(len(real_train))]).long()
    probe = _train_probe(x, y.to(x.device), 2, settings, rng)
    with torch.no_grad():
        hit_replay = (probe(replay_test).argmax(1) == 1).float().mean()
        hit_real = (probe(real_test).argmax(1) == 0).float().mean()
    return float((hit_replay + hit_real) / 2)


@dataclass
class Fidelity:
    """The fidelity figures of one generator on one experience's classes (dicts by class id)."""

    probe: dict[int, float]
    probe_real: dict[int, float]
    classifier: dict[int, float]
    diversity: dict[int, float]
    separability: float

    def as_dict(self) -> dict:
        def keyed(d: dict[int, float]) -> dict[str, float]:
            return {str(k): v for k, v in d.items()}  # JSON object keys are strings

        return {
            "probe": keyed(self.probe),
            "probe_min": min(self.probe.values()),
            "probe_real": keyed(self.probe_real),
            "classifier": keyed(self.classifier),
            "classifier_mean": sum(self.classifier.values()) / max(1, len(self.classifier)),
            "diversity": keyed(self.diversity),
            "diversity_mean": sum(self.diversity.values()) / max(1, len(self.diversity)),
            "separability": self.separability,
        }


def measure_fidelity(
    *,
    sample: Sampler,
    classifier: nn.Module,
    features: Callable[[torch.Tensor], torch.Tensor],
    real_train: tuple[torch.Tensor, torch.Tensor],
    real_test: tuple[torch.Tensor, torch.Tensor],
    classes: Sequence[int],
    replay_classes: Sequence[int],
    active: Sequence[int],
    settings: ProbeSettings,
    rng: torch.Generator,
) -> Fidelity:
    """All fidelity figures after a GAN phase.

    Args:
        sample: the (EMA) generator: labels -> images in the classifier's input range.
        classifier: the frozen classifier the GAN was trained against (eval mode).
        features: images -> the classifier's features at the feature layer.
        real_train: real images and labels of ``classes`` the GAN trained on.
        real_test: real images and labels of ``classes`` held out from the GAN phase.
        classes: the experience's classes (those with real images at hand).
        replay_classes: every class the generator makes now (``classifier`` is measured on all).
        active: the classes the classifier may predict.
        settings: probe sizes; rng: seeded CPU generator.
    """
    device = real_test[0].device
    # 1. train on replay, test on real (and the same probe trained on real: its ceiling)
    rx, ry = replay_pool(sample, classes, settings.n_per_class, device)
    probe = probe_accuracy(rx, ry, *real_test, classes, settings, rng)
    probe_real = probe_accuracy(*real_train, *real_test, classes, settings, rng)
    # 2. the frozen classifier on replay of every class the generator makes
    ax, ay = replay_pool(sample, replay_classes, max(32, settings.n_per_class // 2), device)
    cls_acc = classifier_accuracy(classifier, ax, ay, active)
    # 3. within-class feature spread, replay over real
    with torch.no_grad():
        f_replay = features(rx)
        f_real = features(real_train[0][:2048])
    div = diversity_ratio(f_replay, ry, f_real, real_train[1][:2048])
    # 4. can a probe tell replay from real? (trained on GAN-phase images, tested on held-out)
    sep = replay_separability(sample, rx, real_train, real_test, classes, settings, rng)
    return Fidelity(probe, probe_real, cls_acc, div, sep)


def replay_separability(
    sample: Sampler,
    replay: torch.Tensor,
    real_train: tuple[torch.Tensor, torch.Tensor],
    real_test: tuple[torch.Tensor, torch.Tensor],
    classes: Sequence[int],
    settings: ProbeSettings,
    rng: torch.Generator,
) -> float:
    """:func:`separability` of the generator's replay: a probe trained on ``replay`` (drawn for
    the GAN-phase images) against ``real_train``, tested on fresh replay of ``classes`` (as many
    per class as the held-out images allow) against ``real_test``."""
    n_test = max(1, len(real_test[1]) // len(classes))
    rx2, _ = replay_pool(sample, classes, n_test, real_test[0].device)
    return separability(replay, real_train[0], rx2, real_test[0], settings, rng)
