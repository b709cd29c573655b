"""Genifer: GAN parts, augmentation, plugin behaviour and state (tiny, seeded, CPU)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import dill
import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import IncrementalClassifier
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn
from torch.nn import functional as F

from avalanche_d2l.augment import AdaptiveAugment, AugmentConfig, augment
from avalanche_d2l.checkpointing import load_strategy, save_strategy
from avalanche_d2l.genifer import fidelity
from avalanche_d2l.models.classifiers import small_cnn
from avalanche_d2l.models.feature_gan import FeatureGANTrainer, frozen_copy
from avalanche_d2l.models.feature_gan_parts import channels_last_on_cpu
from avalanche_d2l.models.gan import (
    DiscriminatorConfig,
    EqualConv2d,
    EqualLinear,
    FeatureDiscriminator,
    GeneratorConfig,
    ModulatedConv2d,
    StyleGenerator,
)
from avalanche_d2l.registry import RunConfig, get_strategy
from avalanche_d2l.scenarios import tensor_benchmark
from avalanche_d2l.strategies import Genifer, GeniferConfig, GeniferPlugin
from avalanche_d2l.strategies.genifer import build_genifer
from avalanche_d2l.utils import capture_features, seed_everything

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4

# Few GAN steps, tiny widths: enough for 8 px digits on CPU.
TINY = GeniferConfig(
    generator={"output_range": (0.0, 1.0)},
    # fixed lengths and no fidelity probes: fast, and what these tests need
    gan={
        "steps_first": 120,
        "steps": 120,
        "batch_size": 32,
        "stop": "fixed",
        "measure_fidelity": False,
    },
    replay={"ce_weight": 1.0, "kd_weight": 1.0, "fd_weight": 1.0},
    progress=False,
)


def _gan_trainer(cfg: GeniferConfig, rng: torch.Generator) -> FeatureGANTrainer:
    """The GAN trainer with its own parts of ``cfg``."""
    return FeatureGANTrainer(
        gan=cfg.gan,
        discriminator=cfg.discriminator,
        augment=cfg.augment,
        rng=rng,
        progress=cfg.progress,
    )


def _digits(image_size: int = 8, classes: int = 6):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=image_size, mode="bilinear", antialias=True).clamp(0, 1)
    y = torch.tensor(d.target)
    keep = y < classes
    x, y = x[keep], y[keep]
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n_test = len(y) // 4
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


@pytest.fixture(scope="module")
def tiny_bench():
    xtr, ytr, xte, yte = _digits()
    return tensor_benchmark(xtr, ytr, xte, yte, n_experiences=3, class_order=list(range(6)))


def _tensors(dataset):
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
    return batch[0], batch[1]


def _evaluator():
    return EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])


def _run(bench, *, genifer: bool, use_naive_door: bool = False, model=None, config=TINY):
    seed_everything(0)
    model = model or small_cnn(num_classes=6, in_channels=1, width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    common = {
        "train_mb_size": 32,
        "train_epochs": EPOCHS,
        "eval_mb_size": 256,
        "evaluator": _evaluator(),
    }
    if not genifer:
        strategy = Naive(model=model, optimizer=opt, **common)
    elif use_naive_door:
        strategy = Naive(
            model=model,
            optimizer=opt,
            plugins=[GeniferPlugin(feature_layer="block3", config=config)],
            **common,
        )
    else:
        strategy = Genifer(
            model=model, optimizer=opt, feature_layer="block3", config=config, **common
        )
    for exp in bench.train_stream:
        strategy.train(exp)
    results = strategy.eval(bench.test_stream)
    return strategy, results


@pytest.fixture(scope="module")
def genifer_run(tiny_bench):
    return _run(tiny_bench, genifer=True)


def _plugin(strategy) -> GeniferPlugin:
    return next(p for p in strategy.plugins if isinstance(p, GeniferPlugin))


# ---------------------------------------------------------------- generator / discriminator
@pytest.mark.parametrize("resolution", [8, 16, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_shapes_and_range(resolution, channels):
    torch.manual_seed(0)
    g = StyleGenerator(
        config=GeneratorConfig(
            num_classes=5,
            resolution=resolution,
            img_channels=channels,
            z_dim=16,
            w_dim=16,
            embed_dim=8,
            channel_base=64,
            channel_max=16,
        )
    )
    x = g.generate(6, [0, 3], generator=torch.Generator().manual_seed(1))
    assert x.shape == (6, channels, resolution, resolution)
    assert x.min() >= 0 and x.max() <= 1
    # convs: one at 4x4 plus two per upsampling
    assert len(g.convs) == 1 + 2 * int(math.log2(resolution // 4))


def test_generator_rejects_bad_resolution():
    with pytest.raises(ValueError, match="power of two"):
        StyleGenerator(config=GeneratorConfig(resolution=12))


def test_equalised_lr_scales_at_runtime():
    torch.manual_seed(0)
    lin = EqualLinear(256, 8)
    assert abs(float(lin.weight.detach().std()) - 1.0) < 0.1  # stored at unit variance
    x = torch.randn(4, 256)
    assert torch.allclose(lin(x), F.linear(x, lin.weight / 16.0, lin.bias), atol=1e-6)
    with torch.no_grad():
        lin.weight.mul_(2)  # the scale is applied at run time, not baked into the weight
    assert torch.allclose(lin(x), F.linear(x, lin.weight / 16.0, lin.bias), atol=1e-6)
    conv = EqualConv2d(4, 3, 3)
    xi = torch.randn(2, 4, 5, 5)
    ref = F.conv2d(xi, conv.weight / math.sqrt(4 * 9), conv.bias, padding=1)
    assert torch.allclose(conv(xi), ref, atol=1e-6)
    mapping = EqualLinear(8, 8, lr_mul=0.01)
    assert abs(float(mapping.weight.detach().std()) - 100.0) < 30  # stored as weight / lr_mul
    assert mapping.weight_gain == pytest.approx(0.01 / math.sqrt(8))


def test_discriminator_reads_features_not_pixels(tiny_bench):
    model = small_cnn(num_classes=6, in_channels=1, width=8)
    plugin = GeniferPlugin(
        feature_layer="block2", config=TINY.merged({"gan": {"steps_first": 3}, "num_classes": 6})
    )
    plugin.teacher = frozen_copy(model)
    exp = tiny_bench.train_stream[0]
    plugin.build_models(image_shape=(1, 8, 8), num_classes=6, classifier=plugin.teacher)
    d = plugin.discriminator
    with capture_features(model, "block2") as hook:
        model.eval()(torch.zeros(1, 1, 8, 8))
        feat_shape = tuple(hook.pop().shape[1:])
    assert d.feature_shape == feat_shape == (16, 2, 2)
    with pytest.raises(ValueError, match="never reads pixels"):
        d(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    seen = []
    original = d.forward

    def spy(features, labels):
        seen.append(tuple(features.shape[1:]))
        return original(features, labels)

    d.forward = spy
    plugin.train_gan(experience=exp, steps=3)
    assert seen and set(seen) == {feat_shape}


def test_discriminator_on_feature_vectors():
    d = FeatureDiscriminator(
        config=DiscriminatorConfig(feature_shape=(12,), num_classes=3, channels=8)
    )
    out = d(torch.randn(6, 12), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert out.shape == (6,) and torch.isfinite(out).all()


# ---------------------------------------------------------------- augmentation
def test_augment_is_differentiable_and_identity_at_p0():
    x = torch.rand(8, 3, 16, 16, requires_grad=True)
    y = augment(x, 1.0, AugmentConfig(), generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.allclose(y, x)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert augment(x, 0.0) is x


def test_integer_ops_are_exact():
    x = torch.rand(4, 1, 8, 8)
    cfg = AugmentConfig(
        xflip=True,
        rotate90=False,
        translate=0.0,
        scale_std=0.0,
        rotate_max_deg=0.0,
        brightness_std=0.0,
        contrast_std=0.0,
    )
    y = augment(x, 1.0, cfg, generator=torch.Generator().manual_seed(3))
    for a, b in zip(x, y):  # every image is either unchanged or exactly mirrored
        assert torch.allclose(a, b, atol=1e-5) or torch.allclose(a.flip(-1), b, atol=1e-5)


def test_ada_p_moves_toward_target_and_is_capped():
    ada = AdaptiveAugment(target=0.5, p_max=0.5, kimg=1.0)
    for _ in range(50):  # D is sure about reals: overfitting -> p grows, up to the cap
        ada.accumulate(torch.ones(64))
        ada.adjust()
    assert float(ada.p) == pytest.approx(0.5)
    for _ in range(3):  # D unsure: p decreases
        ada.accumulate(-torch.ones(64))
        ada.adjust()
    assert 0 < float(ada.p) < 0.5
    for _ in range(50):
        ada.accumulate(-torch.ones(64))
        ada.adjust()
    assert float(ada.p) == 0.0
    ada.p.fill_(0.3)
    ada.reset()
    assert float(ada.p) == 0.0


# ---------------------------------------------------------------- GAN training
def test_gan_steps_move_features_toward_real(tiny_bench):
    seed_everything(0)
    exp = tiny_bench.train_stream[0]
    model = small_cnn(num_classes=6, in_channels=1, width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = _tensors(exp.dataset)
    for _ in range(60):  # a quickly trained classifier
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    plugin = GeniferPlugin(
        feature_layer="block3", config=TINY.merged({"gan": {"ema_kimg": 0.5}, "num_classes": 6})
    )
    plugin.teacher = frozen_copy(model)

    def feature_gap() -> float:
        gap = 0.0
        with capture_features(plugin.teacher, "block3") as hook:
            for c in (0, 1):
                plugin.teacher(x[y == c])
                real = hook.pop().mean(0)
                fake_x = plugin.generator_ema.generate(
                    64, torch.full((64,), c), generator=torch.Generator().manual_seed(0)
                )
                plugin.teacher(fake_x)
                gap += float((hook.pop().mean(0) - real).norm() / real.norm())
        return gap

    plugin.build_models(image_shape=(1, 8, 8), num_classes=6, classifier=plugin.teacher)
    before = feature_gap()
    summary = plugin.train_gan(experience=exp, steps=150)
    after = feature_gap()
    assert math.isfinite(summary["loss_d"]) and math.isfinite(summary["loss_g"])
    assert after < 0.7 * before, (before, after)
    assert plugin.generated_classes == [0, 1]


def test_class_weight_pulls_the_replay_towards_its_labels_class(tiny_bench):
    """``gan.class_weight`` (conditioning strength, an experiment): after the first steps of a
    phase the frozen classifier reads the replay as the labels it was drawn for more surely
    than without the term, on the same seed (later the feature discriminator alone gets there
    too on these digits; the README's one-change table has the effect on real streams)."""
    exp = tiny_bench.train_stream[0]
    x, y = _tensors(exp.dataset)
    seed_everything(0)
    model = small_cnn(num_classes=6, in_channels=1, width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    teacher = frozen_copy(model)
    labels = torch.tensor([0, 1] * 64)

    def replay_ce(weight: float) -> tuple[float, dict]:
        seed_everything(0)
        cfg = {"gan": {"class_weight": weight, "ema_kimg": 0.5}, "num_classes": 6}
        plugin = GeniferPlugin(feature_layer="block3", config=TINY.merged(cfg))
        plugin.teacher = teacher
        plugin.build_models(image_shape=(1, 8, 8), num_classes=6, classifier=teacher)
        summary = plugin.train_gan(experience=exp, steps=10)
        fake = plugin.generator_ema.generate(
            len(labels), labels, generator=torch.Generator().manual_seed(1)
        )
        with torch.no_grad():
            return float(F.cross_entropy(teacher(fake)[:, :2], labels)), summary

    off, summary_off = replay_ce(0.0)
    on, summary_on = replay_ce(10.0)
    assert "class_ce" not in summary_off and math.isfinite(summary_on["class_ce"])
    assert on < 0.85 * off, (on, off)


# ---------------------------------------------------------------- the whole method
def test_genifer_forgets_less_than_naive(tiny_bench, genifer_run):
    _, naive = _run(tiny_bench, genifer=False)
    strategy, gen = genifer_run
    key = "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000"
    stream = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
    assert gen[key] > naive[key] + 0.2, (gen[key], naive[key])
    assert gen[stream] > naive[stream] + 0.05, (gen[stream], naive[stream])
    plugin = strategy.genifer
    # GAN trained after experiences 0 and 1 only: the stream's last experience is known
    assert [h["experience"] for h in plugin.history] == [0, 1]
    assert plugin.generated_classes == [0, 1, 2, 3]
    assert plugin.seen_classes == list(range(6))


def test_no_real_sample_is_stored(tiny_bench, genifer_run):
    strategy, _ = genifer_run
    plugin = strategy.genifer
    real = torch.cat([_tensors(exp.dataset)[0] for exp in tiny_bench.train_stream]).flatten(1)
    tensors = []

    def walk(obj, depth=0):
        if depth > 6:
            return
        if torch.is_tensor(obj):
            tensors.append(obj)
        elif isinstance(obj, nn.Module):
            tensors.extend(obj.state_dict().values())
        elif isinstance(obj, torch.optim.Optimizer):
            walk(obj.state_dict(), depth + 1)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                walk(v, depth + 1)
        elif dataclasses.is_dataclass(obj):
            walk(dataclasses.asdict(obj), depth + 1)

    walk(plugin.__dict__)
    assert tensors
    d = real.shape[1]
    for t in tensors:
        t = t.detach().float().flatten()
        if t.numel() < d:
            continue
        rows = t[: t.numel() // d * d].view(-1, d)
        assert torch.cdist(rows, real).min() > 1e-4, "a real training image is stored"
    # and nothing image-sized is kept besides model weights
    assert plugin._replay is None and plugin._hook is None


def test_sample_grid(genifer_run):
    strategy, _ = genifer_run
    grid = strategy.genifer.sample_grid(3)
    assert grid.shape == (4 * 3, 1, 8, 8)
    assert torch.equal(grid, strategy.genifer.sample_grid(3))  # seeded


def test_state_dict_and_checkpoint_round_trip(tiny_bench, genifer_run, tmp_path):
    strategy, _ = genifer_run
    plugin = strategy.genifer
    z = torch.randn(5, plugin.generator.config.z_dim, generator=torch.Generator().manual_seed(7))
    labels = torch.tensor([0, 1, 2, 3, 0])
    noise = plugin.generator.make_noise(5, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = plugin.generator_ema(z, labels, noise)
    # 1. state_dict -> fresh plugin
    fresh = GeniferPlugin(feature_layer="block3", config=TINY)
    fresh.load_state_dict(plugin.state_dict(), model=strategy.model)
    with torch.no_grad():
        assert torch.equal(fresh.generator_ema(z, labels, noise), ref)
    assert float(fresh.gan.ada.p) == float(plugin.gan.ada.p)
    assert fresh.seen_classes == plugin.seen_classes
    assert (
        fresh.gan.opt_g.state_dict()["state"].keys()
        == plugin.gan.opt_g.state_dict()["state"].keys()
    )
    for a, b in zip(fresh.teacher.state_dict().values(), plugin.teacher.state_dict().values()):
        assert torch.equal(a, b)
    # 2. dill (what Avalanche's save_checkpoint uses) round trip of the plugin, optimisers too
    restored = dill.loads(dill.dumps(plugin))
    with torch.no_grad():
        assert torch.equal(restored.generator_ema(z, labels, noise), ref)
    assert (
        restored.gan.opt_g.state_dict()["state"].keys()
        == plugin.gan.opt_g.state_dict()["state"].keys()
    )
    # 3. the whole strategy through Avalanche's checkpointing (as the command line does)
    fname = tmp_path / "ckpt.pkl"
    save_strategy(strategy, fname)
    other = Genifer(
        model=small_cnn(num_classes=6, in_channels=1, width=16),
        optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
        feature_layer="block3",
        config=TINY,
        evaluator=_evaluator(),
    )
    other, _ = load_strategy(other, fname)
    with torch.no_grad():
        assert torch.equal(_plugin(other).generator_ema(z, labels, noise), ref)


def test_naive_with_plugin_is_the_same_algorithm(tiny_bench):
    bench2 = tensor_benchmark(*_digits(classes=4), n_experiences=2, class_order=list(range(4)))
    cfg = TINY.merged({"gan": {"steps_first": 10, "steps": 10}})
    a, _ = _run(bench2, genifer=True, config=cfg)
    b, _ = _run(bench2, genifer=True, use_naive_door=True, config=cfg)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    pa, pb = _plugin(a), _plugin(b)
    for va, vb in zip(
        pa.generator_ema.state_dict().values(), pb.generator_ema.state_dict().values()
    ):
        assert torch.equal(va, vb)


def test_incremental_classifier_head(tiny_bench):
    seed_everything(0)
    model = small_cnn(num_classes=2, in_channels=1, width=16)
    model.classifier = IncrementalClassifier(model.classifier.in_features, initial_out_features=2)
    cfg = TINY.merged({"gan": {"steps_first": 20, "steps": 20}})
    strategy = Genifer(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        feature_layer="block3",
        config=cfg,
        train_mb_size=32,
        train_epochs=1,
        evaluator=_evaluator(),
    )
    kd_shapes = []
    original = strategy.genifer.kd_loss

    def spy(student, teacher, *form):
        kd_shapes.append((student.shape[1], teacher.shape[1]))
        loss = original(student, teacher, *form)
        assert torch.isfinite(loss)
        return loss

    strategy.genifer.kd_loss = spy
    for exp in tiny_bench.train_stream[:2]:
        strategy.train(exp)
    res = strategy.eval(tiny_bench.test_stream[:2])
    assert kd_shapes and set(kd_shapes) == {(4, 2)}  # the teacher's head has the old classes
    assert math.isfinite(res["Top1_Acc_Stream/eval_phase/test_stream/Task000"])


def test_wrong_feature_layer_is_a_clear_error():
    model = small_cnn(num_classes=6, in_channels=1)
    with pytest.raises(ValueError, match="block3"):
        Genifer(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            feature_layer="layer3",
            evaluator=_evaluator(),
        )


# ---------------------------------------------------------------- configs / registry / factory
def test_registered_with_cpu_preset_defaults():
    info = get_strategy("genifer")
    assert info.config_type is GeniferConfig and info.keeps_buffer is False
    assert info.make_config({}) == GeniferConfig()
    cfg = GeniferConfig()  # the tuned CPU preset of the 16 px offline streams
    assert (
        cfg.replay.ce_weight,
        cfg.replay.kd_weight,
        cfg.replay.fd_weight,
        cfg.replay.fd_distance,
    ) == (1.0, 3.0, 1.0, "rms")
    assert (cfg.gan.steps_first, cfg.gan.steps, cfg.gan.batch_size) == (800, 800, 64)
    assert (cfg.gan.stop, cfg.gan.min_steps, cfg.gan.threshold) == ("fidelity", 100, 0.85)
    assert (
        cfg.generator.z_dim,
        cfg.generator.channel_base,
        cfg.generator.channel_max,
        cfg.discriminator.channels,
    ) == (64, 256, 32, 64)
    assert (cfg.gan.ema_kimg, cfg.gan.ema_rampup, cfg.augment.kimg, cfg.replay.crop_pad) == (
        5.0,
        0.05,
        20.0,
        2,
    )
    assert (cfg.head, cfg.replay.teacher_bn, cfg.gan.r1_lazy_scaling) == (
        "fresh_per_task",
        "train",
        "interval",
    )
    assert cfg.generator.output_range is None  # measured from the data
    with pytest.raises(ValueError, match="unknown key 'gan.stepz'"):
        GeniferConfig.from_dict({"gan": {"stepz": 3}})
    with pytest.raises(ValueError, match="head must be one of"):
        GeniferConfig(head="grown")
    assert GeniferConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.fingerprint() == dataclasses.replace(cfg, progress=False).fingerprint()
    assert cfg.fingerprint() != cfg.merged({"replay": {"kd_weight": 1.0}}).fingerprint()


def test_build_genifer_factory(tiny_bench, tmp_path):
    run = RunConfig(
        benchmark="split_digits",
        feature_layer="block3",
        epochs=1,
        quick=True,
        seed=3,
        work_dir=str(tmp_path),
    )
    model = small_cnn(num_classes=6, in_channels=1, width=8)
    strategy = build_genifer(
        model=model,
        optimizer=torch.optim.Adam(model.parameters()),
        criterion=nn.CrossEntropyLoss(),
        benchmark=tiny_bench,
        run=run,
        config=GeniferConfig(replay={"kd_weight": 2.0}),
        evaluator=_evaluator(),
        device="cpu",
    )
    plugin = strategy.genifer
    assert isinstance(strategy, Genifer)
    assert (plugin.config.seed, plugin.config.num_classes, plugin.config.replay.kd_weight) == (
        3,
        6,
        2.0,
    )
    assert plugin.image_shape == (1, 8, 8) and plugin.checkpoint_dir == str(tmp_path)
    assert plugin.config.gan.steps <= 40 and strategy.train_epochs == 1


# ---------------------------------------------------------------- the reference preset
@pytest.fixture(scope="module")
def reference():
    from avalanche_d2l.experiments import load_experiment

    exp = load_experiment("genifer_cifar100")
    return exp, exp.method_config("genifer")


def test_reference_preset_architecture(reference):
    """Generator and discriminator of the authors' CIFAR-100 code (deviation 9)."""
    _, cfg = reference
    assert (
        cfg.generator.z_dim,
        cfg.generator.embed_dim,
        cfg.generator.w_dim,
        cfg.generator.mapping_layers,
    ) == (512, 256, 512, 2)
    assert (cfg.generator.family, cfg.generator.output_activation) == (
        "reference",
        "none",
    )  # linear output
    assert (cfg.generator.channel_base, cfg.generator.channel_max) == (
        2048,
        512,
    )  # 512, 256, 128, 64
    assert (
        cfg.discriminator.family,
        cfg.discriminator.channels,
        cfg.discriminator.mbstd_group,
        cfg.discriminator.cmap_dim,
    ) == (
        "reference",
        512,
        32,
        128,
    )
    g = StyleGenerator(
        config=GeneratorConfig(
            num_classes=100,
            resolution=32,
            img_channels=3,
            z_dim=8,
            embed_dim=4,
            w_dim=8,
            channel_base=cfg.generator.channel_base,
            channel_max=cfg.generator.channel_max,
            family="reference",
            output_activation="none",
        )
    )
    assert [(c.weight.shape[1], c.weight.shape[0]) for c in g.convs] == [
        (512, 512),
        (512, 256),
        (256, 256),
        (256, 128),
        (128, 128),
        (128, 64),
        (64, 64),
    ]
    assert g.noise_sizes == [4, 4, 8, 8, 16, 16, 32]
    assert g.to_img.weight.shape[-1] == 3 and g.to_img.noise_strength is None  # 3x3, no noise
    assert torch.equal(g.const, torch.ones_like(g.const))
    assert g(torch.randn(2, 8), torch.tensor([0, 99])).shape == (2, 3, 32, 32)
    d = FeatureDiscriminator(
        config=DiscriminatorConfig(
            feature_shape=(256, 8, 8),
            num_classes=100,
            channels=cfg.discriminator.channels,
            mbstd_group=cfg.discriminator.mbstd_group,
            cmap_dim=cfg.discriminator.cmap_dim,
            family="reference",
        )
    )
    convs = [
        (m.weight.shape[1], m.weight.shape[0]) for b in d.blocks for m in b if hasattr(m, "weight")
    ]
    assert convs == [(256, 256), (256, 256), (256, 512), (512, 512)]
    assert d.final_conv.weight.shape[:2] == (512, 513)
    assert d.fc.weight.shape == (512, 2048) and d.out.weight.shape == (128, 512)
    assert d.label_embed.bias is None
    assert d(torch.randn(64, 256, 8, 8), torch.arange(64)).shape == (64,)


def test_reference_preset_gan_training(reference):
    """Lazy R1, EMA, optimisers, self-distillation, augmentation, checkpoints (4, 5, 7, 10, 11)."""
    _, cfg = reference
    assert (cfg.gan.r1_gamma, cfg.gan.r1_interval, cfg.gan.r1_lazy_scaling) == (
        0.5,
        16,
        "reference",
    )
    lr, betas, factor = _gan_trainer(cfg, torch.Generator()).d_adam_settings()
    assert factor == pytest.approx(16 / 17) and lr == pytest.approx(0.0025 * 16 / 17)
    assert betas == (0.0, pytest.approx(0.99 ** (16 / 17)))
    assert (cfg.gan.steps_first, cfg.gan.steps, cfg.gan.batch_size) == (250_000, 80_000, 64)
    assert cfg.gan.stop == "fixed"  # the authors' fixed lengths
    assert (cfg.gan.g_lr, cfg.gan.adam_betas, cfg.gan.optimizer_reset) == (
        0.0025,
        (0.0, 0.99),
        True,
    )
    assert (cfg.gan.ema_kimg, cfg.gan.ema_rampup, cfg.gan.ema_ramp_phase) == (500.0, None, 0.5)
    trainer = _gan_trainer(cfg, torch.Generator())
    assert trainer.ema_beta(0, 1000, 64) == 0.0  # the ramp restarts every phase
    assert trainer.ema_beta(500, 1000, 64) == pytest.approx(0.5 ** (64 / 500_000))
    assert trainer.ema_beta(250, 1000, 64) == pytest.approx(0.5 ** (64 / 250_000))
    # self-distillation and colour augmentation in the reference's normalised space
    from avalanche_d2l.scenarios import CIFAR100_MEAN, CIFAR100_STD

    exp, _ = reference
    a = cfg.augment.ops
    if exp.benchmark.get("normalize"):  # the data is normalised already: no extra scale
        assert cfg.gan.distill_std is None and (a.brightness_std, a.color_center) == (0.2, 0.0)
    else:  # [0, 1] pixels: divide by the dataset's std; brightness 0.2 normalised units
        assert cfg.gan.distill_std == CIFAR100_STD
        assert a.brightness_std == pytest.approx(0.2 * sum(CIFAR100_STD) / 3, abs=1e-4)
        assert a.color_center == pytest.approx(sum(CIFAR100_MEAN) / 3, abs=1e-3)
    assert cfg.gan.distill_weight == 10.0
    assert (a.aniso_std, a.xfrac_std, a.lumaflip, a.hue_max) == (0.2, 0.125, True, 1.0)
    assert (a.translate, a.scale_std, a.rotate_max_deg, a.contrast_std, a.saturation_std) == (
        0.125,
        0.2,
        180.0,
        0.5,
        1.0,
    )
    assert (cfg.augment.target, cfg.augment.p_max, cfg.augment.interval, cfg.augment.kimg) == (
        0.5,
        0.5,
        4,
        256.0,
    )
    assert cfg.gan.checkpoint_every == 10_000


def test_reference_preset_classifier_update(reference):
    """Loss weights, head, teacher BN, batch split, replay augmentation, optimisers (1-3, 6, 8)."""
    exp, cfg = reference
    assert (
        cfg.replay.ce_weight,
        cfg.replay.kd_weight,
        cfg.replay.fd_weight,
        cfg.replay.kd_temperature,
    ) == (
        0.02,
        0.98,
        1.0,
        1.0,
    )
    assert cfg.replay.fd_distance == "norm"  # the reference's unnormalised norm at its own layer
    assert (cfg.head, cfg.replay.teacher_bn) == ("fresh_per_task", "train")
    assert (cfg.replay.split, exp.training.train_mb_size) == (0.5, 32)  # 16 real + 16 replayed
    assert (cfg.replay.crop_pad, cfg.replay.flip, cfg.replay.padding) == (4, True, "edge")
    first, later = exp.training.first_experience, exp.training.optimizer
    assert (first.name, first.lr, first.weight_decay, first.nesterov) == ("sgd", 0.1, 5e-4, True)
    assert (later.name, later.lr, later.weight_decay, later.decoupled_weight_decay) == (
        "radam",
        1e-4,
        5e-4,
        True,
    )


# ---------------------------------------------------------------- any image shape (issue 12)
class UserCNN(nn.Module):
    """A user's own classifier (not the package's small_cnn)."""

    def __init__(self, channels: int, n_classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(8 * 16, n_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _shape_bench(channels: int, size: int, low: float = -0.5, high: float = 1.5):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(24)
    x = low + (high - low) * torch.rand(len(y), channels, size, size, generator=g)
    x[:, :, : size // 2] *= (y[:, None, None, None] % 2).float()  # class-dependent patterns
    return tensor_benchmark(x, y, x, y, n_experiences=2, class_order=list(range(4)))


class _CaptureReplay:
    """Records the mixed mini-batch right after Genifer's before_forward (plugin order)."""

    def __init__(self, plugin):
        self.plugin, self.batches, self.built_before_training = plugin, [], None

    def before_training_iteration(self, strategy, **kw):
        if self.built_before_training is None:
            self.built_before_training = self.plugin.generator is not None

    def before_forward(self, strategy, **kw):
        if self.plugin._replay is not None:
            n = self.plugin._replay["n_real"]
            self.batches.append((strategy.mb_x[:n].clone(), strategy.mb_x[n:].clone()))


def _user_genifer(model: nn.Module, *spies) -> tuple[GeniferPlugin, Naive]:
    """Genifer through the public plugin on a user's model (2 GAN steps, no fidelity): the
    plugin and a Naive strategy carrying it, then one ``spy(plugin)`` per class given."""
    plugin = GeniferPlugin(
        feature_layer="features.2",
        config=GeniferConfig(
            gan={"steps_first": 2, "batch_size": 8, "measure_fidelity": False}, progress=False
        ),
    )
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        train_mb_size=16,
        train_epochs=1,
        evaluator=_evaluator(),
        plugins=[plugin, *(spy(plugin) for spy in spies)],
    )
    return plugin, strategy


@pytest.mark.parametrize("channels,size", [(1, 16), (1, 28), (3, 32)])
def test_replay_matches_real_images(channels, size):
    bench = _shape_bench(channels, size)
    plugin, strategy = _user_genifer(UserCNN(channels), _CaptureReplay)
    capture = strategy.plugins[1]
    for exp in bench.train_stream:
        strategy.train(exp)
    assert capture.built_before_training  # G fitted to the data before any training
    gc = plugin.generator.config
    assert gc.resolution == {16: 16, 28: 32, 32: 32}[size]
    assert gc.output_size == (None if size in (16, 32) else (28, 28))
    real, replay = capture.batches[0]
    assert replay.dtype == real.dtype and replay.shape[1:] == real.shape[1:] == (
        channels,
        size,
        size,
    )
    data = torch.cat([bench.train_stream[0].dataset[i][0][None] for i in range(48)])
    lo, hi = data.amin(dim=(0, 2, 3)), data.amax(dim=(0, 2, 3))
    assert (replay.amin(dim=(0, 2, 3)) >= lo - 1e-6).all()
    assert (replay.amax(dim=(0, 2, 3)) <= hi + 1e-6).all()
    assert replay.min() < 0.5 * lo.max() or replay.max() > 0.5 * hi.min()  # not in [0, 1] only


class ViewCNN(UserCNN):
    """A user's classifier that flattens with ``.view``: impossible on a channels-last map."""

    def forward(self, x):
        f = self.features(x)
        return self.head(f.view(f.size(0), -1))


@pytest.mark.parametrize("model_cls,channels_last", [(UserCNN, True), (ViewCNN, False)])
def test_teacher_layout_on_cpu(model_cls, channels_last):
    """On CPU the frozen teacher runs in channels-last (faster) only where that gives the same
    outputs: a model whose forward cannot take it keeps its layout, and Genifer still trains."""
    bench = _shape_bench(3, 16)
    model = model_cls(3)
    plugin, strategy = _user_genifer(model)
    strategy.train(bench.train_stream[0])
    teacher = plugin.teacher
    conv = teacher.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert not teacher.training and not teacher.features[1].training  # modes restored
    x = bench.test_stream[0].dataset[0][0][None].repeat(4, 1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(teacher(x), model.eval()(x), atol=1e-5)
    model.train()
    strategy.train(bench.train_stream[1])  # replay and distillation through that teacher
    assert plugin.seen_classes == [0, 1, 2, 3] and plugin.generated_classes == [0, 1]
    assert (
        plugin.teacher.features[0].weight.is_contiguous(memory_format=torch.channels_last)
        is channels_last
    )
    # our generator follows the CPU layout as well
    assert plugin.generator.convs[0].weight.is_contiguous(memory_format=torch.channels_last)


class _ViewWhenTraining(nn.Module):
    """Flattens with ``.view`` in train mode only (passes an eval-mode check alone)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        f = self.bn(self.conv(x))
        return f.view(len(f), -1) if self.training else f.flatten(1)


def _channels_last(model: nn.Module) -> bool:
    """Whether ``model``'s 4-D weights are stored channels-last (not in the default layout)."""
    return any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())


def test_channels_last_check_leaves_the_module_as_it_was():
    x = torch.rand(4, 3, 8, 8)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    stats = plain[1].running_mean.clone()
    assert channels_last_on_cpu(plain, x) is plain and _channels_last(plain)
    assert plain.training and plain[1].training  # modes untouched
    assert torch.equal(plain[1].running_mean, stats)  # the check ran on a copy
    # a forward that cannot take channels-last, in either mode, keeps the default layout
    for model in (ViewCNN(3), _ViewWhenTraining()):
        assert not _channels_last(channels_last_on_cpu(model, x))
    # a forward that fails on the example (1 channel expected) changes nothing either
    assert not _channels_last(channels_last_on_cpu(UserCNN(1), x))
    # the fidelity probes follow the CPU layout
    probe = fidelity._train_probe(
        torch.rand(16, 1, 8, 8),
        torch.arange(2).repeat(8),
        2,
        fidelity.ProbeSettings(steps=1, pool=2),
        torch.Generator().manual_seed(0),
    )
    assert _channels_last(probe)


def test_unservable_shapes_are_clear_errors():
    plugin = GeniferPlugin(feature_layer="features.2", config=TINY)
    with pytest.raises(ValueError, match="image_shape"):
        plugin.fit_to_data(image_shape=(64,), num_classes=4, classifier=UserCNN(1))
    with pytest.raises(ValueError, match="too small"):
        plugin.fit_to_data(image_shape=(1, 2, 2), num_classes=4, classifier=UserCNN(1))
    g = StyleGenerator(
        config=GeneratorConfig(
            num_classes=4,
            resolution=16,
            img_channels=1,
            z_dim=8,
            w_dim=8,
            embed_dim=4,
            channel_base=32,
            channel_max=8,
        )
    )
    plugin = GeniferPlugin(feature_layer="features.2", config=TINY, generator=g)
    with pytest.raises(ValueError, match=r"img_channels=3, output_size=\(16, 16\)"):
        plugin.fit_to_data(image_shape=(3, 16, 16), num_classes=4, classifier=UserCNN(3))


# ---------------------------------------------------------------- head semantics (deviation 2)
class _Spy:
    def __init__(self, plugin):
        self.plugin, self.outputs = plugin, []

    def before_backward(self, strategy, **kw):
        self.outputs.append(strategy.mb_output.detach().clone())


def test_fresh_per_task_head_with_fixed_size_model():
    bench = _shape_bench(1, 8, 0.0, 1.0)
    model = UserCNN(1, n_classes=4)
    cfg = GeniferConfig(
        gan={"steps_first": 2, "batch_size": 8, "measure_fidelity": False},
        progress=False,
        head="fresh_per_task",
    )
    plugin = GeniferPlugin(feature_layer="features.2", config=cfg)
    spy = _Spy(plugin)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=16,
        train_epochs=1,
        evaluator=_evaluator(),
        plugins=[plugin, spy],
    )
    strategy.train(bench.train_stream[0])
    # experience 0: units 2, 3 (unseen) are masked in the loss and get no gradient
    assert (spy.outputs[0][:, 2:] == -1e4).all() and (spy.outputs[0][:, :2] > -1e3).all()
    rows_before = model.head.weight[2:].detach().clone()
    seen = []

    class _Rows:
        def before_training_iteration(self, strategy, **kw):
            if not seen:
                seen.append(model.head.weight[2:].detach().clone())

    strategy.plugins.append(_Rows())
    out = strategy.eval(bench.test_stream[:1])
    assert out["Top1_Acc_Stream/eval_phase/test_stream/Task000"] > 0.5
    with torch.no_grad():
        x = bench.test_stream[0].dataset[0][0][None]
        strategy.model.eval()
        strategy.mb_output = model(x)
        plugin.after_eval_forward(strategy)
        assert int(strategy.mb_output.argmax(1)) in (0, 1)  # never an unseen class
    strategy.train(bench.train_stream[1])
    # experience 1: the new classes' rows were re-initialised (fresh head) before training
    assert not torch.equal(seen[0], rows_before)
    assert seen[0].abs().max() <= 1 / math.sqrt(model.head.in_features)
    assert (spy.outputs[-1] > -1e3).all()  # all four classes active now


def test_fresh_per_task_head_with_incremental_classifier(tiny_bench):
    seed_everything(0)
    model = small_cnn(num_classes=2, in_channels=1, width=8)
    model.classifier = IncrementalClassifier(model.classifier.in_features, initial_out_features=2)
    cfg = TINY.merged(
        {"gan": {"steps_first": 3, "steps": 3}, "head": "fresh_per_task"}
        | {"replay": {"teacher_bn": "train"}}
    )
    strategy = Genifer(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        feature_layer="block3",
        config=cfg,
        train_mb_size=32,
        train_epochs=2,
        evaluator=_evaluator(),
    )
    kd = []
    original = strategy.genifer.kd_loss

    def spy(student, teacher, *form):
        kd.append((student.shape[1], teacher.shape[1], float(original(student, teacher, *form))))
        return original(student, teacher, *form)

    strategy.genifer.kd_loss = spy
    for exp in tiny_bench.train_stream[:2]:
        strategy.train(exp)
    res = strategy.eval(tiny_bench.test_stream[:2])
    assert model.classifier.classifier.out_features == 4
    assert kd and all(s == 4 and t == 2 and math.isfinite(v) for s, t, v in kd)
    # the new classes are learnt (experience 1's test accuracy well above chance)
    assert res["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp001"] > 0.5


# ---------------------------------------------------------------- classifier update (3, 6)
def test_teacher_bn_train_and_batch_split(tiny_bench):
    cfg = TINY.merged(
        {"gan": {"steps_first": 2, "steps": 2}, "replay": {"teacher_bn": "train", "split": 0.5}}
    )
    model = small_cnn(num_classes=6, in_channels=1, width=8)
    strategy = Genifer(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        feature_layer="block3",
        config=cfg,
        train_mb_size=32,
        train_epochs=1,
        evaluator=_evaluator(),
    )
    strategy.train(tiny_bench.train_stream[0])
    calls = []
    teacher = strategy.genifer.teacher
    original = teacher.forward

    def spy(x):
        calls.append((x.shape[0], teacher.training))
        return original(x)

    teacher.forward = spy
    sizes = []

    class _Size:
        def before_backward(self, strategy, **kw):
            sizes.append(strategy.mb_output.shape[0])

    strategy.plugins.append(_Size())
    strategy.train(tiny_bench.train_stream[1])
    # the teacher saw the whole mixed batch (16 real + 16 replayed) in train mode
    assert calls[0] == (32, True) and not teacher.training
    assert sizes[0] == 16  # the criterion sees the 16 real images of the 32-image batch


# ---------------------------------------------------------------- GAN details (4, 7, 11)
def _trainer(cfg, n_classes=4):
    torch.manual_seed(0)
    trainer = _gan_trainer(cfg, torch.Generator().manual_seed(0))
    trainer.set_generator(
        StyleGenerator(
            config=GeneratorConfig(
                num_classes=n_classes,
                resolution=8,
                img_channels=1,
                z_dim=cfg.generator.z_dim,
                embed_dim=4,
                w_dim=8,
                channel_base=32,
                channel_max=8,
            )
        )
    )
    classifier = frozen_copy(small_cnn(num_classes=n_classes, in_channels=1, width=4))
    trainer.build_discriminator((8, 2, 2), n_classes)
    return trainer, classifier


def _phase_data():
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([2, 3]).repeat(8)
    return tensor_benchmark(x, y, x, y, n_experiences=1).train_stream[0].dataset


SMALL_GAN = GeniferConfig(
    generator={"z_dim": 8, "output_range": (0.0, 1.0)},
    discriminator={"channels": 8},
    gan={"batch_size": 8, "r1_interval": 2},
    progress=False,
)


def test_r1_lazy_scaling_interval_vs_reference():
    cpu = _gan_trainer(GeniferConfig(), torch.Generator())
    assert cpu.d_adam_settings() == (0.0025, (0.0, 0.99), 16.0)  # StyleGAN2's lazy weight
    ref = _gan_trainer(GeniferConfig(gan={"r1_lazy_scaling": "reference"}), torch.Generator())
    lr, _, c = ref.d_adam_settings()
    assert c * 17 == pytest.approx(16) and lr == pytest.approx(0.0025 * 16 / 17)
    ref.set_generator(
        StyleGenerator(
            config=GeneratorConfig(
                resolution=8, z_dim=8, w_dim=8, embed_dim=4, channel_base=32, channel_max=8
            )
        )
    )
    ref.build_discriminator((8, 2, 2), 10)
    ref.make_optimizers()
    assert ref.opt_d.param_groups[0]["betas"][1] == pytest.approx(0.99 ** (16 / 17))


def test_self_distillation_in_normalised_space():
    data = _phase_data()
    out = {}
    for std in (None, (0.25,)):
        cfg = SMALL_GAN.merged({"gan": {"distill_std": std}})
        trainer, classifier = _trainer(cfg)
        trainer.history.append({})  # a previous phase exists: G starts from the EMA copy
        out[std] = trainer.train_phase(
            classifier=classifier,
            feature_layer="block2",
            dataset=data,
            new_classes=[2, 3],
            old_classes=[0, 1],
            steps=1,
        )["distill"]
    assert out[(0.25,)] == pytest.approx(4 * out[None], rel=1e-5)


def test_gan_optimizer_reset_per_phase():
    data = _phase_data()
    for reset in (False, True):
        trainer, classifier = _trainer(SMALL_GAN.merged({"gan": {"optimizer_reset": reset}}))
        for _ in range(2):
            trainer.train_phase(
                classifier=classifier,
                feature_layer="block2",
                dataset=data,
                new_classes=[2, 3],
                old_classes=[],
                steps=2,
            )
        step = next(iter(trainer.opt_g.state.values()))["step"]
        assert int(step) == (2 if reset else 4)


def test_modulated_conv_equals_per_sample_weights():
    """The demodulated convolution equals StyleGAN2's per-sample weight form (modulated and
    demodulated weights, one grouped convolution), which it computes without that weight."""
    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 5, 8, use_noise=False, activation=False)
    x, w = torch.randn(3, 6, 7, 7), torch.randn(3, 8)
    styles = conv.affine(w)
    weight = conv.weight[None] * conv.weight_gain * styles[:, None, :, None, None]
    weight = weight * (weight.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8).rsqrt()
    ref = F.conv2d(x.reshape(1, -1, 7, 7), weight.reshape(-1, 6, 3, 3), padding=1, groups=3)
    ref = ref.reshape(3, 5, 7, 7) + conv.bias[None, :, None, None]
    torch.testing.assert_close(conv(x, w), ref, rtol=1e-5, atol=1e-5)


def test_gan_checkpoint_loads_with_weights_only(tmp_path, monkeypatch):
    """A mid-phase GAN checkpoint holds tensors and plain values only: it loads with
    ``torch.load(weights_only=True)`` (no pickled code runs when a checkpoint is read)."""
    data = _phase_data()
    cfg = SMALL_GAN.merged({"gan": {"checkpoint_every": 2}})
    trainer, classifier = _trainer(cfg)
    trainer.history.append({})
    ckpt = tmp_path / "phase.pt"
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: None)  # keep the finished file
    trainer.train_phase(
        classifier=classifier,
        feature_layer="block2",
        dataset=data,
        new_classes=[2, 3],
        old_classes=[0, 1],
        steps=4,
        checkpoint_path=ckpt,
    )
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["next_step"] == 2 and set(saved["trainer"]) >= {"generator", "discriminator"}


@pytest.mark.parametrize("image_weight", [0.0, 1.0])
def test_killed_gan_phase_resumes_exactly(tmp_path, image_weight):
    """Also with the image discriminator (``gan.image_weight``): it and its optimiser are in the
    checkpoint."""
    data = _phase_data()
    cfg = SMALL_GAN.merged({"gan": {"checkpoint_every": 2, "image_weight": image_weight}})
    kw = dict(feature_layer="block2", dataset=data, new_classes=[2, 3], old_classes=[0, 1], steps=6)
    ref, classifier = _trainer(cfg)
    ref.history.append({})
    ref.train_phase(classifier=classifier, **kw)
    ckpt = tmp_path / "phase.pt"
    killed, classifier = _trainer(cfg)
    killed.history.append({})
    calls = {"n": 0}
    original = killed.discriminator.forward

    def crash(*a):
        calls["n"] += 1
        if calls["n"] > 2 * 3:  # two D calls per step: dies in step 4 (after the step-4 ckpt)
            raise KeyboardInterrupt
        return original(*a)

    killed.discriminator.forward = crash
    with pytest.raises(KeyboardInterrupt):
        killed.train_phase(classifier=classifier, checkpoint_path=ckpt, **kw)
    assert ckpt.exists() and not list(tmp_path.glob("*.tmp"))
    resumed, classifier = _trainer(cfg)
    resumed.history.append({})
    summary = resumed.train_phase(classifier=classifier, checkpoint_path=ckpt, **kw)
    assert summary["resumed_at"] == 2 and not ckpt.exists()
    for a, b in zip(
        ref.generator_ema.state_dict().values(), resumed.generator_ema.state_dict().values()
    ):
        assert torch.equal(a, b)
    for a, b in zip(
        ref.discriminator.state_dict().values(), resumed.discriminator.state_dict().values()
    ):
        assert torch.equal(a, b)
    if image_weight:
        ref_di, res_di = ref.image_discriminator, resumed.image_discriminator
        assert ref_di is not None and res_di is not None
        for a, b in zip(ref_di.state_dict().values(), res_di.state_dict().values()):
            assert torch.equal(a, b)
        assert resumed.opt_di is not None and resumed.opt_di.state
        pickled = dill.loads(dill.dumps(resumed))  # as a strategy checkpoint stores the trainer
        assert pickled.opt_di is not None and len(pickled.opt_di.state) == len(resumed.opt_di.state)
    else:
        assert resumed.image_discriminator is None and "opt_di" not in resumed.state_dict()


@pytest.mark.parametrize("content", ["truncated", "planted"])
def test_unreadable_gan_checkpoint_is_set_aside_and_the_phase_restarts(tmp_path, content):
    """A truncated checkpoint, or a pickle that would run code, is never fatal and never run:
    it is moved to ``<name>.corrupt`` with one warning, and the phase trains from its start to
    the same generator as a run without a checkpoint."""
    import pickle

    data = _phase_data()
    cfg = SMALL_GAN.merged({"gan": {"checkpoint_every": 2}})
    kw = dict(feature_layer="block2", dataset=data, new_classes=[2, 3], old_classes=[0, 1], steps=4)
    ref, classifier = _trainer(cfg)
    ref.history.append({})
    ref.train_phase(classifier=classifier, **kw)
    ckpt = tmp_path / "phase.pt"
    marker = tmp_path / "ran"
    if content == "truncated":
        ckpt.write_bytes(b"PK\x03\x04 not a whole zip")
    else:

        class Payload:
            def __reduce__(self):
                return (pathlib_touch, (str(marker),))

        ckpt.write_bytes(pickle.dumps(Payload()))
    again, classifier = _trainer(cfg)
    again.history.append({})
    with pytest.warns(UserWarning, match="could not be read"):
        summary = again.train_phase(classifier=classifier, checkpoint_path=ckpt, **kw)
    assert not marker.exists()  # the planted code did not run
    assert (tmp_path / "phase.pt.corrupt").is_file()
    assert summary.get("resumed_at", 0) == 0
    for a, b in zip(
        ref.generator_ema.state_dict().values(), again.generator_ema.state_dict().values()
    ):
        assert torch.equal(a, b)


def pathlib_touch(path: str) -> None:
    Path(path).touch()


# ---------------------------------------------------------------- augmentation (10)
def test_reference_augmentation_ops():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 8, 8, generator=g)
    only = dict(
        xflip=False,
        rotate90=False,
        translate=0.0,
        scale_std=0.0,
        rotate_max_deg=0.0,
        brightness_std=0.0,
        contrast_std=0.0,
        saturation_std=0.0,
    )
    y = augment(x, 1.0, AugmentConfig(**only, lumaflip=True), generator=g)
    for a, b in zip(x, y):  # each image unchanged or inverted around 0.5
        assert torch.allclose(a, b) or torch.allclose(1 - a, b, atol=1e-6)
    rgb = torch.rand(8, 3, 8, 8, generator=g)
    grey = rgb.mean(1, keepdim=True).expand_as(rgb)
    h = augment(grey, 1.0, AugmentConfig(**only, hue_max=1.0), generator=g)
    assert torch.allclose(h, grey, atol=1e-5)  # grey pixels have no hue
    h = augment(rgb, 1.0, AugmentConfig(**only, hue_max=1.0), generator=g)
    assert torch.allclose(h.mean(1), rgb.mean(1), atol=1e-5) and not torch.allclose(h, rgb)
    xr = x.clone().requires_grad_(True)
    z = augment(xr, 1.0, AugmentConfig(**only, aniso_std=0.2, xfrac_std=0.125), generator=g)
    assert not torch.allclose(z, x)
    z.sum().backward()
    assert xr.grad.abs().sum() > 0
    # adaptation speed: 4 steps x 64 images move p by 0.001 with ada_kimg=256 (4k steps 0 -> 1)
    ada = AdaptiveAugment(target=0.5, p_max=0.5, kimg=256.0)
    for _ in range(4):
        ada.accumulate(torch.ones(64))
    ada.adjust()
    assert float(ada.p) == pytest.approx(0.001)
