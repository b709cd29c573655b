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
from avalanche_d2l.models.classifiers import small_cnn
from avalanche_d2l.models.gan import (
    DiscriminatorConfig,
    EqualConv2d,
    EqualLinear,
    FeatureDiscriminator,
    GeneratorConfig,
    StyleGenerator,
)
from avalanche_d2l.registry import RunConfig
from avalanche_d2l.scenarios import tensor_benchmark
from avalanche_d2l.strategies import Genifer, GeniferConfig, GeniferPlugin
from avalanche_d2l.strategies.genifer import build_genifer, default_config
from avalanche_d2l.utils import capture_features, seed_everything

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4

# Few GAN steps, tiny widths: enough for 8 px digits on CPU.
TINY = GeniferConfig(gan_steps_first=120, gan_steps=120, gan_batch_size=32, progress=False,
                     ce_weight=1.0, kd_weight=1.0, fd_weight=1.0)


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
    common = {"train_mb_size": 32, "train_epochs": EPOCHS, "eval_mb_size": 256,
              "evaluator": _evaluator()}
    if not genifer:
        strategy = Naive(model=model, optimizer=opt, **common)
    elif use_naive_door:
        strategy = Naive(model=model, optimizer=opt,
                         plugins=[GeniferPlugin(feature_layer="block3", config=config)], **common)
    else:
        strategy = Genifer(model=model, optimizer=opt, feature_layer="block3", config=config,
                           **common)
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
    g = StyleGenerator(config=GeneratorConfig(num_classes=5, resolution=resolution,
                                              img_channels=channels, z_dim=16, w_dim=16,
                                              embed_dim=8, channel_base=64, channel_max=16))
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
    plugin = GeniferPlugin(feature_layer="block2", config=dataclasses.replace(
        TINY, gan_steps_first=3, num_classes=6))
    from avalanche_d2l.strategies.genifer import _frozen_copy

    plugin.teacher = _frozen_copy(model)
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
    d = FeatureDiscriminator(config=DiscriminatorConfig(feature_shape=(12,), num_classes=3,
                                                        channels=8))
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
    cfg = AugmentConfig(xflip=True, rotate90=False, translate=0.0, scale_std=0.0,
                        rotate_max_deg=0.0, brightness_std=0.0, contrast_std=0.0)
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
    plugin = GeniferPlugin(feature_layer="block3", config=dataclasses.replace(
        TINY, num_classes=6, ema_kimg=0.5))
    from avalanche_d2l.strategies.genifer import _frozen_copy

    plugin.teacher = _frozen_copy(model)

    def feature_gap() -> float:
        gap = 0.0
        with capture_features(plugin.teacher, "block3") as hook:
            for c in (0, 1):
                plugin.teacher(x[y == c])
                real = hook.pop().mean(0)
                fake_x = plugin.generator_ema.generate(
                    64, torch.full((64,), c), generator=torch.Generator().manual_seed(0))
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
    assert float(fresh.ada.p) == float(plugin.ada.p)
    assert fresh.seen_classes == plugin.seen_classes
    assert fresh.opt_g.state_dict()["state"].keys() == plugin.opt_g.state_dict()["state"].keys()
    for a, b in zip(fresh.teacher.state_dict().values(), plugin.teacher.state_dict().values()):
        assert torch.equal(a, b)
    # 2. dill (what Avalanche's save_checkpoint uses) round trip of the plugin, optimisers too
    restored = dill.loads(dill.dumps(plugin))
    with torch.no_grad():
        assert torch.equal(restored.generator_ema(z, labels, noise), ref)
    assert restored.opt_g.state_dict()["state"].keys() == plugin.opt_g.state_dict()["state"].keys()
    # 3. the whole strategy through Avalanche's checkpointing (as the command line does)
    fname = tmp_path / "ckpt.pkl"
    save_strategy(strategy, fname)
    other = Genifer(model=small_cnn(num_classes=6, in_channels=1, width=16),
                    optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
                    feature_layer="block3", config=TINY, evaluator=_evaluator())
    other, _ = load_strategy(other, fname)
    with torch.no_grad():
        assert torch.equal(_plugin(other).generator_ema(z, labels, noise), ref)


def test_naive_with_plugin_is_the_same_algorithm(tiny_bench):
    bench2 = tensor_benchmark(*_digits(classes=4), n_experiences=2, class_order=list(range(4)))
    cfg = dataclasses.replace(TINY, gan_steps_first=10, gan_steps=10)
    a, _ = _run(bench2, genifer=True, config=cfg)
    b, _ = _run(bench2, genifer=True, use_naive_door=True, config=cfg)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    pa, pb = _plugin(a), _plugin(b)
    for va, vb in zip(pa.generator_ema.state_dict().values(),
                      pb.generator_ema.state_dict().values()):
        assert torch.equal(va, vb)


def test_incremental_classifier_head(tiny_bench):
    seed_everything(0)
    model = small_cnn(num_classes=2, in_channels=1, width=16)
    model.classifier = IncrementalClassifier(model.classifier.in_features, initial_out_features=2)
    cfg = dataclasses.replace(TINY, gan_steps_first=20, gan_steps=20)
    strategy = Genifer(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                       feature_layer="block3", config=cfg, train_mb_size=32, train_epochs=1,
                       evaluator=_evaluator())
    kd_shapes = []
    original = strategy.genifer.kd_loss

    def spy(student, teacher):
        kd_shapes.append((student.shape[1], teacher.shape[1]))
        loss = original(student, teacher)
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
        Genifer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                feature_layer="layer3", evaluator=_evaluator())


# ---------------------------------------------------------------- configs / factory
def test_configs_round_trip(tmp_path):
    cfg = GeniferConfig(z_dim=7, augment=AugmentConfig(xflip=False))
    cfg.to_json(tmp_path / "c.json", extra={"note": 1})
    assert GeniferConfig.from_json(tmp_path / "c.json") == cfg
    # the split_digits file holds exactly the built-in CPU defaults
    assert GeniferConfig.from_json(ROOT / "benchmarks/configs/genifer_split_digits.json") == \
        GeniferConfig()
    cifar = GeniferConfig.from_json(ROOT / "benchmarks/configs/genifer_cifar100_b50.json")
    assert (cifar.resolution, cifar.z_dim, cifar.gan_steps_first, cifar.gan_steps) == \
        (32, 512, 250_000, 80_000)
    raw = json.loads((ROOT / "benchmarks/configs/genifer_cifar100_b50.json").read_text())
    assert raw["classifier"]["feature_layer"] == "layer3"
    with pytest.raises(ValueError, match="unknown GeniferConfig keys"):
        GeniferConfig.from_dict({"gan_stepz": 3})
    assert default_config("split_digits", quick=True).gan_steps <= 40


def test_build_genifer_factory(tiny_bench):
    run = RunConfig(benchmark="split_digits", feature_layer="block3", epochs=1, quick=True,
                    seed=3)
    model = small_cnn(num_classes=6, in_channels=1, width=8)
    strategy = build_genifer(model=model, optimizer=torch.optim.Adam(model.parameters()),
                             criterion=nn.CrossEntropyLoss(), benchmark=tiny_bench, run=run,
                             evaluator=_evaluator(), device="cpu")
    cfg = strategy.genifer.config
    assert isinstance(strategy, Genifer)
    assert (cfg.seed, cfg.num_classes, cfg.resolution) == (3, 6, 8)
    assert cfg.gan_steps <= 40 and strategy.train_epochs == 1
