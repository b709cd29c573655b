"""Classifiers: logits shapes, named feature layers, module lookup errors, trainability."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from avalanche_d2l.models import resnet18_cifar, small_cnn
from avalanche_d2l.utils import capture_features, get_module, seed_everything, training_mode

WIDTH = 8  # narrow networks keep the tests fast; shapes scale with `width` as checked below


def _resnet(num_classes: int, in_channels: int) -> nn.Module:
    return resnet18_cifar(num_classes=num_classes, in_channels=in_channels, width=WIDTH)


def _cnn(num_classes: int, in_channels: int) -> nn.Module:
    return small_cnn(num_classes=num_classes, in_channels=in_channels, width=WIDTH)


def _resnet_features(n: int, s: int) -> dict[str, tuple[int, ...]]:
    w = WIDTH
    return {
        "layer1": (n, w, s, s),
        "layer2": (n, 2 * w, s // 2, s // 2),
        "layer3": (n, 4 * w, s // 4, s // 4),
        "layer4": (n, 8 * w, s // 8, s // 8),
        "features": (n, 8 * w),
    }


def _cnn_features(n: int, s: int) -> dict[str, tuple[int, ...]]:
    w = WIDTH
    return {
        "block1": (n, w, s // 2, s // 2),
        "block2": (n, 2 * w, s // 4, s // 4),
        "block3": (n, 2 * w, s // 4, s // 4),
        "features": (n, 128),
    }


MODELS = {
    "resnet18_cifar": (_resnet, _resnet_features, "linear"),
    "small_cnn": (_cnn, _cnn_features, "classifier"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [8, 16, 32])
def test_logits_and_feature_shapes(name, in_channels, size):
    build, feature_shapes, head = MODELS[name]
    torch.manual_seed(0)
    model = build(7, in_channels).eval()
    x = torch.rand(2, in_channels, size, size)
    expected = feature_shapes(2, size)
    for layer, shape in expected.items():
        with capture_features(model, layer) as hook:
            logits = model(x)
            feats = hook.pop()
        assert tuple(feats.shape) == shape, layer
        assert logits.shape == (2, 7)
    assert isinstance(get_module(model, head), nn.Linear)
    assert get_module(model, head).out_features == 7


def test_default_width_resnet_matches_reference_sizes():
    model = resnet18_cifar(num_classes=100).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 11.0e6 < n_params < 11.4e6  # the CIFAR ResNet-18 has ~11.2 M parameters
    with capture_features(model, "layer3") as hook, torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 100)
        assert tuple(hook.pop().shape) == (1, 256, 8, 8)  # Genifer's feature map


@pytest.mark.parametrize("size", [84, 224])
def test_small_stem_resnet_keeps_full_resolution_at_imagenet_sizes(size):
    """The D2L files' backbone: no stride or max-pool in the stem at any size, so ``layer1`` is
    at the input's resolution and ``layer4`` at about 1/8 (torchvision's stem would give 1/4 and
    1/32)."""
    model = _resnet(5, 3).eval()
    x = torch.rand(1, 3, size, size)
    expected = {"layer1": size, "layer2": -(-size // 2), "layer4": -(-size // 8)}
    for layer, side in expected.items():
        with capture_features(model, layer) as hook, torch.no_grad():
            assert model(x).shape == (1, 5)
            assert tuple(hook.pop().shape[-2:]) == (side, side), layer
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)


def test_captured_features_keep_the_graph():
    torch.manual_seed(0)
    model = _cnn(5, 3)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    with capture_features(model, "block2") as hook:
        model(x)
        hook.pop().pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_hook_removed_and_pop_without_forward_errors():
    model = _cnn(5, 1)
    with (
        capture_features(model, "block3") as hook,
        pytest.raises(RuntimeError, match="produced no output"),
    ):
        hook.pop()
    model(torch.rand(1, 1, 8, 8))
    assert hook.output is None  # removed on exit: later forwards are not captured


@pytest.mark.parametrize("name", sorted(MODELS))
def test_get_module_wrong_name_lists_valid_names(name):
    build, feature_shapes, _ = MODELS[name]
    model = build(3, 1)
    with pytest.raises(ValueError, match="not a module of") as err:
        get_module(model, "layer9")
    message = str(err.value)
    for valid in [n for n in feature_shapes(1, 8) if n.startswith(("layer", "block"))]:
        assert valid in message
    with pytest.raises(ValueError, match="not a module of"):
        capture_features(model, "nope").__enter__()
    with pytest.raises(ValueError):
        get_module(model, "")  # the root module is not a feature layer


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sgd_steps_reduce_loss_on_fixed_batch(name):
    build = MODELS[name][0]
    seed_everything(0)
    model = build(4, 3).train()
    x, y = torch.rand(16, 3, 16, 16), torch.arange(16) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def test_get_module_error_lists_resnet_top_level_layers():
    with pytest.raises(ValueError) as err:
        get_module(_resnet(3, 1), "layer9")
    assert "features" in str(err.value) and "linear" in str(err.value)


def test_training_mode_restores_every_submodules_flag_also_on_error():
    net = small_cnn(10, 1, width=8)
    net.train()
    net.block2.eval()  # a mixed state, e.g. a frozen BatchNorm block
    with training_mode(net, False):
        assert not any(m.training for m in net.modules())
    assert net.training and net.block1.training and not net.block2.training
    with pytest.raises(RuntimeError, match="boom"), training_mode(net, True):
        assert all(m.training for m in net.modules())
        raise RuntimeError("boom")
    assert net.training and net.block1.training and not net.block2.training
