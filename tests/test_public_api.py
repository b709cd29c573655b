"""Every registered strategy through the constructors a user calls, on a user's own CNN.

For each strategy of :func:`avalanche_d2l.registry.strategy_names` and each stream (split_digits
at 16 and 28 px with 1 channel, split_color_digits at 32 px with 3 channels): train experience 0,
check that it learned (experience-0 accuracy well above chance), checkpoint, resume into a freshly
built strategy, train experience 1 and evaluate. Our methods are built as a user builds them
(``D2L(...)``, ``Genifer(...)``, ``ER_ACE``/``DER`` with ``D2LPlugin``); Avalanche's baselines
through the registry factory. Tiny settings: a tiny random dreamer for D2L (8 px grey native
images mapped to the stream's size and channels), Genifer's quick config with 10 GAN steps,
two epochs.
"""

from __future__ import annotations

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from tiny_models import tiny_pixel_dreamer
from torch import nn

from avalanche_d2l.checkpointing import load_strategy, save_strategy
from avalanche_d2l.dreaming.prompts import DreamConfig
from avalanche_d2l.registry import RunConfig, build_strategy, strategy_names
from avalanche_d2l.scenarios import split_color_digits, split_digits
from avalanche_d2l.utils import seed_everything

STREAMS = {
    "digits16": lambda: split_digits(n_experiences=5, image_size=16, seed=0),
    "digits28": lambda: split_digits(n_experiences=5, image_size=28, seed=0),
    "color32": lambda: split_color_digits(n_experiences=5, image_size=32, seed=0),
}
EPOCHS, MB, MEM = 2, 16, 40
EXP_ACC = "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{:03d}"


class UserCNN(nn.Module):
    """What a user writes for their images: not one of the package's models; the flattened
    convolutional features are ``self.features``."""

    def __init__(self, channels: int, size: int, n_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 12, 3, padding=1),
            nn.BatchNorm2d(12),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(12, 24, 3, padding=1),
            nn.BatchNorm2d(24),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(24 * (size // 4) ** 2, n_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


@pytest.fixture(scope="module")
def streams():
    return {name: make() for name, make in STREAMS.items()}


def evaluator() -> EvaluationPlugin:
    return EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])


def tiny_dream_config() -> DreamConfig:
    return DreamConfig(
        steps=1, batch_per_class=2, samples_per_class=4, backprop_steps=1, progress=False
    )


def build(name: str, bench, tmp_path):
    """The strategy ``name`` on a fresh seeded ``UserCNN``, built as a user would."""
    from avalanche.training import DER, ER_ACE

    from avalanche_d2l.models.heads import DreamHeads
    from avalanche_d2l.strategies.d2l import D2L, D2LPlugin
    from avalanche_d2l.strategies.genifer import Genifer, GeniferConfig

    seed_everything(0)
    channels, size, _ = bench.train_stream[0].dataset[0][0].shape
    model = UserCNN(channels, size)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    common = dict(train_mb_size=MB, train_epochs=EPOCHS, eval_mb_size=128, evaluator=evaluator())
    if name == "d2l":
        return D2L(
            model=model,
            optimizer=opt,
            mem_size=MEM,
            dreamer=tiny_pixel_dreamer(),
            dream_config=tiny_dream_config(),
            **common,
        )
    if name in ("er_ace_d2l", "der_d2l"):
        host = ER_ACE if name == "er_ace_d2l" else DER
        return host(
            model=DreamHeads(model, n_classes=10, feature_layer="features"),
            optimizer=opt,
            mem_size=MEM,
            plugins=[D2LPlugin(tiny_pixel_dreamer(), tiny_dream_config())],
            **common,
        )
    if name == "genifer":
        return Genifer(
            model=model,
            optimizer=opt,
            feature_layer="features",
            config=GeniferConfig().quick().merged({"gan": {"steps_first": 10, "steps": 10}}),
            **common,
        )
    run = RunConfig(
        feature_layer="features",
        epochs=EPOCHS,
        train_mb_size=MB,
        eval_mb_size=128,
        mem_size=MEM,
        quick=True,
        work_dir=str(tmp_path),
        progress=False,
    )
    return build_strategy(
        name,
        model=model,
        optimizer=opt,
        criterion=nn.CrossEntropyLoss(),
        benchmark=bench,
        run=run,
        evaluator=evaluator(),
        device="cpu",
    )


@pytest.mark.parametrize("stream", list(STREAMS))
@pytest.mark.parametrize("name", strategy_names())
def test_strategy_learns_checkpoints_and_resumes_on_a_users_cnn(name, stream, streams, tmp_path):
    bench = streams[stream]
    strategy = build(name, bench, tmp_path)
    strategy.train(bench.train_stream[0])
    res = strategy.eval(bench.test_stream[:1])
    # experience 0 holds 2 classes: chance is 0.5 (two epochs of a tiny CNN reach 0.72-1.0)
    assert res[EXP_ACC.format(0)] >= 0.7, (name, stream, res[EXP_ACC.format(0)])

    ckpt = tmp_path / "ckpt.pkl"
    save_strategy(strategy, ckpt)
    resumed, next_exp = load_strategy(build(name, bench, tmp_path), ckpt)
    assert next_exp == 1
    for a, b in zip(resumed.model.state_dict().values(), strategy.model.state_dict().values()):
        assert torch.equal(a, b)
    resumed.train(bench.train_stream[1])
    res = resumed.eval(bench.test_stream[:2])
    assert all(0.0 <= res[EXP_ACC.format(k)] <= 1.0 for k in (0, 1))
    # 4 classes can be predicted now (chance 0.25); experience 1 was learned after resuming
    assert res[EXP_ACC.format(1)] >= 0.5, (name, stream, res[EXP_ACC.format(1)])
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())
