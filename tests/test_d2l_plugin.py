"""D2LPlugin inside Avalanche's own strategies, on a user's classifier that is not ours: the plugin
wraps the model itself, says in one sentence what to pass when it cannot, and its dreamer follows
the strategy's device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import DER, ER_ACE, Replay
from avalanche.training.plugins import EvaluationPlugin
from tiny_models import tiny_pixel_dreamer
from torch import nn

from avalanche_d2l import D2LPlugin, DreamConfig, DreamHeads
from avalanche_d2l.d2l import state as state_mod
from avalanche_d2l.scenarios import split_digits
from avalanche_d2l.utils import seed_everything


class UserCNN(nn.Module):
    """A plain classifier as a user writes it: no module called ``features``."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(16, n_classes)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.fixture(scope="module")
def bench():
    return split_digits(n_experiences=5, image_size=16, seed=0)


def dream_config() -> DreamConfig:
    return DreamConfig(
        steps=1,
        batch_per_class=2,
        samples_per_class=6,
        invert_steps=1,
        sleep_epochs=1,
        progress=False,
    )


def host(name: str, model: nn.Module, plugin: D2LPlugin):
    cls = {"replay": Replay, "er_ace": ER_ACE, "der": DER}[name]
    return cls(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), 3e-3),
        criterion=nn.CrossEntropyLoss(),
        mem_size=40,
        train_mb_size=32,
        train_epochs=4,
        eval_mb_size=64,
        evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]),
        plugins=[plugin],
    )


@pytest.mark.parametrize("name", ["replay", "er_ace", "der"])
def test_avalanche_hosts_train_a_user_cnn_with_dreams_without_a_manual_wrapper(bench, name):
    seed_everything(0)
    net = UserCNN()
    plugin = D2LPlugin(tiny_pixel_dreamer(output_size=16), dream_config())
    strategy = host(name, net, plugin)
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    model = strategy.model
    assert isinstance(model, DreamHeads) and model.net is net
    assert model.n_classes == 10 and model.feature_layer == "body"  # the module feeding fc
    optimised = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in model.parameters()} <= optimised
    # dreams after each experience, on free heads, and a sleep phase on them
    assert [h["experience"] for h in plugin.history] == [0, 1]
    assert all(h["sleep_steps"] > 0 for h in plugin.history)
    assert set(plugin.dream_labels.tolist()) <= set(model.free_heads())
    seen = [int(c) for e in bench.train_stream[:2] for c in e.classes_in_this_experience]
    assert all(int(model.class_to_head[c]) >= 0 for c in seen)
    if name == "replay":  # Avalanche's Replay appends its ReplayPlugin: D2L moved after it
        names = [type(p).__name__ for p in strategy.plugins]
        assert names.index("D2LPlugin") == names.index("ReplayPlugin") + 1
        # the sleep phase of experience 1 saw that experience's classes in the buffer
        new = {int(c) for c in bench.train_stream[1].classes_in_this_experience}
        assert new <= {int(y) for y in strategy.plugins[0].storage_policy.buffer.targets}
    acc = strategy.eval(bench.test_stream[:2])["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert acc > 0.4  # 4 classes seen: above chance (0.25)


def test_evaluation_before_any_training_wraps_the_model_too(bench):
    seed_everything(0)
    plugin = D2LPlugin(tiny_pixel_dreamer(output_size=16), dream_config(), n_extra_heads=2)
    strategy = host("replay", UserCNN(), plugin)
    strategy.eval(bench.test_stream[:1])
    model = strategy.model
    assert isinstance(model, DreamHeads) and model.n_heads == 12
    assert model.extra_head is not None  # 10 outputs, 12 heads: sized from the images
    optimised = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
    assert id(model.extra_head.weight) in optimised
    strategy.train(bench.train_stream[0])
    assert strategy.model is model and len(plugin.history) == 1


class NoLinear(nn.Module):
    """Logits from a 1x1 convolution: no ``nn.Linear`` to find the features by."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Conv2d(8, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.classifier(self.trunk(x))


def test_a_model_whose_features_cannot_be_found_gets_one_sentence_and_the_argument_works(bench):
    strategy = host("replay", NoLinear(), D2LPlugin(tiny_pixel_dreamer(output_size=16)))
    with pytest.raises(ValueError, match=r"pass feature_layer=<module name>, e\.g\. one of trunk"):
        strategy.train(bench.train_stream[0])
    plugin = D2LPlugin(tiny_pixel_dreamer(output_size=16), dream_config(), feature_layer="trunk")
    strategy = host("replay", NoLinear(), plugin)
    strategy.train(bench.train_stream[0])
    assert strategy.model.feature_layer == "trunk" and len(plugin.history) == 1


def test_without_a_benchmark_the_plugin_asks_for_n_classes():
    plugin = D2LPlugin(tiny_pixel_dreamer(output_size=16))
    exp = SimpleNamespace(dataset=None)  # says nothing of its benchmark
    strategy = SimpleNamespace(device=torch.device("cpu"), model=UserCNN(), experience=exp)
    with pytest.raises(ValueError, match=r"pass D2LPlugin\(n_classes=\.\.\.\)"):
        plugin.attach(strategy)


def test_a_dreamer_named_by_a_string_follows_the_strategys_device(monkeypatch, tmp_path):
    loads = []

    def fake_load(source, overrides, *, device, progress):
        loads.append((source, device))
        return tiny_pixel_dreamer(output_size=16)

    monkeypatch.setattr(state_mod, "load_dreamer", fake_load)  # the plugin loads through it
    plugin = D2LPlugin(str(tmp_path / "my_dreamer"), dream_config())
    assert loads == []  # nothing loaded before the strategy's device is known
    model = DreamHeads(UserCNN(), n_classes=10, feature_layer="body", input_shape=(1, 16, 16))
    strategy = SimpleNamespace(device=torch.device("cuda", 3), model=model, experience=None)
    plugin.attach(strategy)
    _ = plugin.base_dreamer
    assert loads == [(str(tmp_path / "my_dreamer"), "cuda:3")]
    given = D2LPlugin(str(tmp_path / "my_dreamer"), dream_config(), dreamer_device="cpu")
    given.attach(strategy)
    _ = given.base_dreamer
    assert loads[-1] == (str(tmp_path / "my_dreamer"), "cpu")  # an explicit device wins


def test_the_feature_layer_is_the_module_feeding_the_last_linear():
    from torchvision.models import resnet18

    from avalanche_d2l.d2l.heads import find_feature_layer

    # fc's input is torch.flatten(avgpool(x)): not a module's output, the same values per sample
    assert find_feature_layer(resnet18(num_classes=10), (3, 32, 32)) == "avgpool"
    assert find_feature_layer(UserCNN(), (1, 16, 16)) == "body"  # body and body.7 return it
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3))
    assert find_feature_layer(plain, (1, 16, 16)) == "2"
    with pytest.raises(ValueError, match="pass feature_layer="):
        find_feature_layer(UserCNN())  # without an input shape: only a module named 'features'


def test_d2l_on_a_user_cnn_without_a_feature_layer_equals_replay_with_the_plugin(bench):
    from avalanche_d2l import D2L

    def make(door: str):
        seed_everything(0)
        net = UserCNN()
        plugin = D2LPlugin(tiny_pixel_dreamer(output_size=16), dream_config())
        if door == "plugin":
            return host("replay", net, plugin), plugin
        strategy = D2L(
            model=net,
            optimizer=torch.optim.Adam(net.parameters(), 3e-3),
            mem_size=40,
            dreamer=tiny_pixel_dreamer(output_size=16),
            dream=dream_config(),
            train_mb_size=32,
            train_epochs=4,
            eval_mb_size=64,
            evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]),
        )
        assert strategy.model is net  # wrapped by its plugin once the images are known
        return strategy, strategy.d2l_plugin

    (a, pa), (b, pb) = make("strategy"), make("plugin")
    for s in (a, b):
        seed_everything(1)
        s.train(bench.train_stream[0])
    assert isinstance(a.model, DreamHeads) and a.model.feature_layer == "body"
    for wa, wb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.allclose(wa, wb)
    assert torch.allclose(pa.dream_images, pb.dream_images)
