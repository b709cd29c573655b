"""Genifer's feature distillation: its strength does not depend on the feature layer's size.

The replay is replaced by real images of the old classes (``_RealReplay``), so what is measured
is the classifier update alone: with a feature layer that is a large conv map or its pooled
vector, the new classes are learned and the old ones kept.

Also here, on the same user CNN: ``gan.stats_weight`` pulls the replay's statistics in every conv
layer towards the real images' when D reads only the pooled vector, and ``gan.image_weight`` its
pixels; and the classifier update's
alternatives to the paper's (``replay.trunk_from_replay``, ``fd_on``, ``ce_classes``) do what they
say, each beside its control.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn
from torch.nn import functional as F

from avalanche_d2l.models.feature_gan_parts import ConvStats, frozen_copy
from avalanche_d2l.scenarios import tensor_benchmark
from avalanche_d2l.strategies import GeniferConfig, GeniferPlugin
from avalanche_d2l.utils import seed_everything


class UserCNN(nn.Module):
    """Three conv blocks with batch norm, global average pooling, a linear head."""

    def __init__(self, n_classes: int = 4, width: int = 16):
        super().__init__()

        def block(cin: int, cout: int, pool: bool) -> nn.Sequential:
            layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))

        self.block1 = block(1, width, True)
        self.block2 = block(width, 2 * width, False)
        self.block3 = block(2 * width, 2 * width, False)  # 32 x 8 x 8 = 2048 values at 16 px
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # 32 values
        self.head = nn.Linear(2 * width, n_classes)

    def forward(self, x):
        return self.head(self.pool(self.block3(self.block2(self.block1(x)))))


def _digits16():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", antialias=True).clamp(0, 1)
    y = torch.tensor(d.target)
    keep = y < 4
    x, y = x[keep], y[keep]
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_test = len(y) // 4
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


class _RealReplay:
    """Stands in for the EMA generator: "generates" real training images of the asked classes."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y
        self.range_low = torch.zeros(1, 1, 1, 1)

    def to(self, device):
        return self

    def sample_labels(self, n, classes, *, generator=None):
        classes = torch.as_tensor(list(classes))
        return classes[torch.randint(len(classes), (n,), generator=generator)]

    def generate(self, n, labels, *, generator=None):
        out = torch.empty(n, *self.x.shape[1:])
        for c in labels.unique():
            pool = self.x[self.y == c]
            where = labels == c
            out[where] = pool[torch.randint(len(pool), (int(where.sum()),), generator=generator)]
        return out

    def clamp(self, x):
        return x


class _MarkedReplay(_RealReplay):
    """Real images of the asked classes with a bright frame no real image has: a faithful replay
    that a classifier can tell from real images (as the GAN's replay is, separability ~1)."""

    def generate(self, n, labels, *, generator=None):
        x = super().generate(n, labels, generator=generator).clone()
        x[..., :3, :] = 1.0
        x[..., -3:, :] = 1.0
        return x


def _second_experience(
    layer: str,
    *,
    replay: type = _RealReplay,
    sgd: bool = False,
    train_mb_size: int = 32,
    epochs: int = 10,
    **overrides,
) -> tuple[nn.Module, nn.Module, GeniferPlugin, tuple[torch.Tensor, torch.Tensor]]:
    """The user CNN after the first experience (a frozen copy), after the second with
    ``replay(x, y)`` over the training images as the replay (Adam, or plain SGD with ``sgd``, so
    that a parameter without gradient keeps its value exactly), the plugin, the test images."""
    xtr, ytr, xte, yte = _digits16()
    bench = tensor_benchmark(xtr, ytr, xte, yte, n_experiences=2, class_order=[0, 1, 2, 3])
    seed_everything(0)
    model = UserCNN()
    cfg = GeniferConfig(
        generator={"output_range": (0.0, 1.0)},
        # no GAN: the replay is real images (below)
        gan={"steps_first": 0, "stop": "fixed", "measure_fidelity": False},
        progress=False,
    ).merged({"replay": {"crop_pad": 0, **overrides}})
    plugin = GeniferPlugin(feature_layer=layer, config=cfg)
    optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.05)
        if sgd
        else torch.optim.Adam(model.parameters(), lr=1e-3)
    )
    strategy = Naive(
        model=model,
        optimizer=optimizer,
        train_mb_size=train_mb_size,
        train_epochs=epochs,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
        plugins=[plugin],
    )
    strategy.train(bench.train_stream[0])
    before = frozen_copy(model)
    plugin.gan.generator_ema = replay(xtr, ytr)
    strategy.train(bench.train_stream[1])
    return before, model, plugin, (xte, yte)


@functools.cache  # the same control serves several tests (deterministic: seeded inside)
def _classifier_update(
    layer: str, epochs: int = 10, replay: type = _RealReplay, **overrides
) -> tuple[float, float]:
    """Accuracy on old (0, 1) and new (2, 3) classes after the second experience."""
    _, model, plugin, (xte, yte) = _second_experience(
        layer, replay=replay, epochs=epochs, **overrides
    )
    model.eval()
    with torch.no_grad():
        pred = plugin.mask_logits(model(xte)).argmax(1)
    old, new = yte < 2, yte >= 2
    acc = (pred == yte).float()
    return float(acc[old].mean()), float(acc[new].mean())


def test_rms_distance_is_independent_of_the_layer_size():
    """A change uniform over space: the conv map and its pooled vector give the same value."""
    plugin = GeniferPlugin(feature_layer="block3", config=GeniferConfig(progress=False))
    t = torch.randn(4, 32, 1, 1)
    delta = torch.randn(4, 32, 1, 1)
    fmap = plugin.feature_distance((t + delta).expand(4, 32, 8, 8), t.expand(4, 32, 8, 8))
    fvec = plugin.feature_distance((t + delta).flatten(1), t.flatten(1))
    assert math.isclose(float(fmap), float(fvec), rel_tol=1e-5)
    ref = GeniferPlugin(
        feature_layer="block3", config=GeniferConfig(replay={"fd_distance": "norm"}, progress=False)
    )
    big = ref.feature_distance((t + delta).expand(4, 32, 8, 8), t.expand(4, 32, 8, 8))
    small = ref.feature_distance((t + delta).flatten(1), t.flatten(1))
    assert math.isclose(float(big), 8 * float(small), rel_tol=1e-5)  # the norm grows with size


@pytest.mark.parametrize("layer", ["block3", "pool"])
def test_new_classes_learn_and_old_kept_with_map_or_pooled_layer(layer):
    old, new = _classifier_update(layer)
    assert new >= 0.85, f"new classes not learned with feature layer {layer}: {new:.2f}"
    assert old >= 0.85, f"old classes forgotten with feature layer {layer}: {old:.2f}"


def test_kd_on_real_images_keeps_old_classes_that_a_separable_replay_loses():
    """The shortcut of benchmarks/genifer_forgetting.py in small: with a replay the classifier
    can tell from real images, distillation on the replay alone loses the old classes' real
    images (the control); ``replay.kd_real`` (the teacher's answers on the real images) keeps
    more of them while the new classes are still learned."""
    control_old, control_new = _classifier_update(
        "block3", epochs=5, replay=_MarkedReplay, kd_real=0.0
    )
    old, new = _classifier_update("block3", epochs=5, replay=_MarkedReplay, kd_real=0.3)
    assert control_old < 0.5, f"the control kept its old classes ({control_old:.2f})"
    assert control_new >= 0.85 and new >= 0.85, (control_new, new)
    assert old >= control_old + 0.15, f"kd_real kept {old:.2f}, control {control_old:.2f}"


def test_kd_real_softmax_old_is_lwf_and_leaves_new_classes_to_the_cross_entropy():
    """``replay.kd_real_softmax="old"``: the student's softmax over the old classes only, so the
    term gives the new classes' logits no gradient and equals Avalanche's ``LwF`` distillation
    up to a constant (the same gradient); the default ``"all"`` pushes the new classes down."""
    from avalanche.training.regularization import LearningWithoutForgetting

    from avalanche_d2l.genifer import losses

    torch.manual_seed(0)
    teacher = torch.randn(8, 4)
    old = [0, 1]

    def new_student() -> torch.Tensor:
        student = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
        student[:, 2:] += 3.0  # real images of the new classes 2 and 3: the student says so
        return student.requires_grad_(True)

    grads = {}
    for form in ("all", "old"):
        student = new_student()
        losses.kd_loss(student, teacher, old, 2.0, form).backward()
        grads[form] = student.grad
    assert bool((grads["all"][:, 2:] > 0).all()), "'all' should push the new classes down"
    assert bool((grads["old"][:, 2:] == 0).all())
    lwf = LearningWithoutForgetting(alpha=1.0, temperature=2.0)
    student = new_student()
    (lwf._distillation_loss(student, teacher, old) * 4.0).backward()  # x T^2, as kd_loss
    assert torch.allclose(student.grad, grads["old"], atol=1e-6)
    with pytest.raises(ValueError, match="kd_real_softmax"):
        GeniferConfig(replay={"kd_real_softmax": "new"})


def test_a_strong_kd_on_real_images_blocks_new_classes_unless_over_the_old_classes_only():
    """The mechanism in a learner: distilling on the real new-class images with the student's
    softmax over all outputs (the default form) at weight 1 keeps the new classes from being
    learned (the control); over the old classes only, the same weight lets them be learned."""
    _, control_new = _classifier_update("block3", epochs=5, replay=_MarkedReplay, kd_real=1.0)
    old, new = _classifier_update(
        "block3", epochs=5, replay=_MarkedReplay, kd_real=1.0, kd_real_softmax="old"
    )
    assert control_new < 0.5, f"the control learned its new classes ({control_new:.2f})"
    assert new >= 0.85, f"new classes not learned with kd_real_softmax='old' ({new:.2f})"


def _gan_phase(teacher, bench, layer: str, gan: dict, steps: int) -> tuple[GeniferPlugin, dict]:
    """One fixed-length GAN phase (``gan`` on top of a fixed stop, no fidelity measurement) on
    the frozen ``teacher``'s ``layer``, on the first experience of the 4-class, 16 px ``bench``:
    the plugin and the phase's summary."""
    fixed = {"steps_first": steps, "stop": "fixed", "measure_fidelity": False}
    cfg = GeniferConfig(
        generator={"output_range": (0.0, 1.0)},
        gan={**fixed, **gan},
        num_classes=4,
        progress=False,
    )
    plugin = GeniferPlugin(feature_layer=layer, config=cfg)
    plugin.teacher = teacher
    plugin.build_models(image_shape=(1, 16, 16), num_classes=4, classifier=teacher)
    return plugin, plugin.train_gan(experience=bench.train_stream[0], steps=steps)


def _first_classes_teacher():
    """The 4-class, 16 px digits stream, the user CNN trained on its classes 0 and 1 (80 Adam
    steps, seed 0) and frozen, and those classes' training images and labels."""
    xtr, ytr, _, _ = _digits16()
    bench = tensor_benchmark(xtr, ytr, xtr[:8], ytr[:8], n_experiences=2, class_order=[0, 1, 2, 3])
    seed_everything(0)
    model = UserCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = xtr[ytr < 2], ytr[ytr < 2]
    for _ in range(80):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return bench, frozen_copy(model), x, y


def _pooled_d_replay(teacher, bench, labels: torch.Tensor, **gan) -> tuple[torch.Tensor, dict]:
    """The replay of ``labels`` after a 100-step phase (seed 0) with D on the pooled vector and
    ``gan`` on top of a batch of 32, and the phase's summary."""
    seed_everything(0)
    gan = {"batch_size": 32, "ema_kimg": 0.5, **gan}
    plugin, summary = _gan_phase(teacher, bench, "pool", gan, steps=100)
    fake = plugin.generator_ema.generate(
        len(labels), labels, generator=torch.Generator().manual_seed(1)
    )
    return fake, summary


def test_stats_weight_pulls_every_conv_layers_statistics_towards_real():
    """D reads the pooled vector (64 values): without the term (its control, weight 0) the
    replay's per-channel statistics in the three conv layers stay far from the real images';
    with ``gan.stats_weight=1`` they come much closer after the same 100 steps and seed."""
    bench, teacher, x, y = _first_classes_teacher()

    def stats_gap(weight: float) -> tuple[float, dict]:
        fake, summary = _pooled_d_replay(teacher, bench, y[:128], stats_weight=weight)
        stats = ConvStats(teacher)
        try:
            stats.active = True
            with torch.no_grad():
                teacher(fake)
                s_fake = stats.take()
                teacher(x[:128])
                s_real = stats.take()
            assert len(s_fake) == stats.layers == 3
        finally:
            stats.remove()
        return float(ConvStats.distance(s_fake, s_real)), summary

    off, summary_off = stats_gap(0.0)
    on, summary_on = stats_gap(1.0)
    assert "conv_stats" not in summary_off and math.isfinite(summary_on["conv_stats"])
    assert on < 0.5 * off, (on, off)


def test_stats_weight_with_the_whole_classifier_pass_and_convs_after_the_feature_layer():
    """With ``class_weight`` the fake pass runs to the logits, through ``block3``'s conv after
    the feature layer ``block2``; the real pass stops at ``block2``. Both must see the same
    convolutions (the earlier version raised "saw different layers" here)."""
    xtr, ytr, _, _ = _digits16()
    bench = tensor_benchmark(xtr, ytr, xtr[:8], ytr[:8], n_experiences=2, class_order=[0, 1, 2, 3])
    seed_everything(0)
    teacher = frozen_copy(UserCNN())
    gan = {"batch_size": 8, "stats_weight": 1.0, "class_weight": 1.0}
    _, summary = _gan_phase(teacher, bench, "block2", gan, steps=3)
    assert math.isfinite(summary["conv_stats"]) and math.isfinite(summary["class_ce"])


def _replay_update(**overrides) -> tuple[nn.Module, nn.Module, GeniferPlugin]:
    """The user CNN before and after one epoch of the second experience (SGD, 16 images)."""
    before, after, plugin, _ = _second_experience(
        "block3", sgd=True, train_mb_size=16, epochs=1, **overrides
    )
    return before, after, plugin


def _changed(before: nn.Module, after: nn.Module, prefix: str) -> bool:
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    return any(not torch.equal(b[n], a[n]) for n in a if n.startswith(prefix))


@pytest.mark.parametrize("trunk_from_replay", [True, False])
def test_trunk_from_replay_false_keeps_the_replay_out_of_the_layers_below_the_feature_layer(
    trunk_from_replay,
):
    """Only the distillation on the replay trains (cross-entropy weight 0, no distillation on
    real images, no feature distillation): with ``trunk_from_replay=False`` the layers up to the
    feature layer keep every parameter exactly, the head still learns; the control (``True``)
    moves both."""
    before, after, _ = _replay_update(
        ce_weight=0.0, kd_real=0.0, fd_weight=0.0, trunk_from_replay=trunk_from_replay
    )
    trunk = [_changed(before, after, b) for b in ("block1", "block2", "block3")]
    assert _changed(before, after, "head")
    assert all(trunk) if trunk_from_replay else not any(trunk), trunk
    assert not after.block3._forward_hooks  # no hook is left behind after training


def test_fd_on_real_distils_the_real_images_features(monkeypatch):
    """``fd_on="real"``: the feature distance compares the student's and the teacher's features
    of the mini-batch's real images (16 of the 48 rows with two replayed images per real one)."""
    seen = []
    original = GeniferPlugin.feature_distance

    def spy(self, student, teacher):
        seen.append((student.shape[0], teacher.shape[0], student.requires_grad))
        return original(self, student, teacher)

    monkeypatch.setattr(GeniferPlugin, "feature_distance", spy)
    _replay_update(fd_on="real", ratio=2.0)
    on_real = list(seen)
    seen.clear()
    _replay_update(ratio=2.0)
    assert on_real[0] == (16, 16, True) and all(s[0] == s[1] for s in on_real)
    assert seen[0][:2] == (32, 32)  # the paper's: on the replayed rows


def test_bad_replay_choices_are_clear_errors():
    with pytest.raises(ValueError, match=r"set replay.fd_on='real' \(or replay.fd_weight=0\)"):
        GeniferConfig(replay={"trunk_from_replay": False})
    with pytest.raises(ValueError, match=r"fd_on must be one of \('replay', 'real'\)"):
        GeniferConfig(replay={"fd_on": "both"})
    with pytest.raises(ValueError, match=r"ce_classes must be one of \('seen', 'current'\)"):
        GeniferConfig(replay={"ce_classes": "all"})
    with pytest.raises(ValueError, match="domain_weight must be >= 0"):
        GeniferConfig(replay={"domain_weight": -1.0})
    assert GeniferConfig(replay={"fd_on": "real"}).fingerprint() != GeniferConfig().fingerprint()


@pytest.mark.parametrize("ce_classes", ["seen", "current"])
def test_ce_classes_current_never_pushes_the_old_classes_down_on_real_images(ce_classes):
    """Only the criterion on the real images trains (no distillation): over the experience's own
    classes (``"current"``) it leaves the old classes' output rows exactly as they were; the
    control (``"seen"``, the paper's) moves them."""
    before, after, _ = _replay_update(
        kd_weight=0.0, kd_real=0.0, fd_weight=0.0, ce_classes=ce_classes
    )
    old_rows = [torch.equal(before.head.weight[c], after.head.weight[c]) for c in (0, 1)]
    assert not torch.equal(before.head.weight[2:], after.head.weight[2:])  # new classes learn
    assert all(old_rows) if ce_classes == "current" else not any(old_rows), old_rows


def test_domain_confusion_probe_learns_and_its_gradient_reaches_the_features_reversed():
    """The probe's own loss falls as its Adam steps; the features receive the negated gradient of
    that loss (gradient reversal), so the classifier is pushed to confuse the probe."""
    from avalanche_d2l.genifer.losses import DomainConfusion

    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(16, 8, 3, 3, generator=gen)
    feats[8:, 0] += 2.0  # the replayed rows (from row 8 on) differ in one channel
    dc = DomainConfusion(8, lr=0.05, device="cpu")
    first = float(dc.loss(feats, n_real=8))
    for _ in range(20):
        dc.loss(feats, n_real=8).backward()
        dc.step()
    assert float(dc.loss(feats, n_real=8)) < first - 0.1
    x = feats.clone().requires_grad_(True)
    dc.loss(x, n_real=8).backward()
    pooled = feats.flatten(2).mean(2).requires_grad_(True)  # the same loss, without reversal
    target = torch.cat([torch.zeros(8), torch.ones(8)])
    F.binary_cross_entropy_with_logits(dc.probe(pooled).squeeze(1), target).backward()
    direct = pooled.grad[:, :, None, None].expand_as(x) / 9  # the mean over the 3x3 map
    torch.testing.assert_close(x.grad, -direct)


def test_domain_confusion_keeps_old_classes_a_separable_replay_loses_at_the_new_ones_cost():
    """With a replay the classifier can tell from real images (framed real images) and no other
    help (``kd_real=0``): the control loses most old classes' real images; a strong domain
    confusion keeps them, and costs new-class accuracy: in class-incremental learning the replay
    holds only old classes and the real images only new ones, so "replay or real" is also
    "old or new", which the term asks the features to forget."""
    control_old, control_new = _classifier_update(
        "block3", epochs=5, replay=_MarkedReplay, kd_real=0.0
    )
    old, new = _classifier_update(
        "block3", epochs=5, replay=_MarkedReplay, kd_real=0.0, domain_weight=10.0
    )
    assert control_old < 0.5 and control_new >= 0.85, (control_old, control_new)
    assert old >= control_old + 0.3, f"domain confusion kept {old:.2f}, control {control_old:.2f}"
    assert new < control_new - 0.15, (new, control_new)


def test_image_weight_pulls_the_replays_pixels_towards_real_images():
    """D reads the pooled vector (64 values), which real and replayed images can share while
    their pixels differ. ``gan.image_weight=1`` adds a discriminator on the images: after the
    same 100 steps and seed, the replay's per-pixel mean and spread are closer to the real
    images' than without it (the control, weight 0), and the summary reports its loss."""
    bench, teacher, x, y = _first_classes_teacher()

    def pixel_gap(weight: float) -> tuple[float, dict]:
        fake, summary = _pooled_d_replay(teacher, bench, y[:256], image_weight=weight)
        real = x[:256]
        gap = (fake.mean(0) - real.mean(0)).abs().mean() + (fake.std(0) - real.std(0)).abs().mean()
        return float(gap), summary

    off, summary_off = pixel_gap(0.0)
    on, summary_on = pixel_gap(1.0)
    assert "loss_d_image" not in summary_off and math.isfinite(summary_on["loss_d_image"])
    assert on < 0.5 * off, (on, off)
