"""One contract over every registered strategy (Avalanche's baselines, our methods, and whatever
a third method file registers): it learns experience 0 (accuracy well above chance, parameters
changed), trains a second experience with finite losses, evaluates, and round-trips through a
checkpoint."""

import math

import pytest
import torch

from avalanche_d2l.checkpointing import load_strategy, save_strategy
from avalanche_d2l.evaluation import make_evaluator
from avalanche_d2l.models import small_cnn
from avalanche_d2l.registry import RunConfig, build_strategy, strategy_names
from avalanche_d2l.scenarios import split_digits
from avalanche_d2l.utils import seed_everything

BUILTIN = {"naive", "cumulative", "lwf", "ewc", "replay", "der", "er_ace", "generative_replay"}
METHODS = {"genifer", "d2l", "er_ace_d2l", "der_d2l"}


def test_registry_has_builtins_and_methods():
    assert BUILTIN | METHODS <= set(strategy_names())


class _LossSpy:
    def __init__(self):
        self.losses = []

    def before_backward(self, strategy, **kwargs):
        self.losses.append(float(strategy.loss))


def _build(name, bench, tmp_path, plugins=()):
    seed_everything(0)
    model = small_cnn(10, 1, width=16)
    run = RunConfig(
        epochs=6,
        train_mb_size=32,
        mem_size=40,
        quick=True,
        seed=0,
        work_dir=str(tmp_path / "work"),
        progress=False,
    )
    return build_strategy(
        name,
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), 3e-3),
        criterion=torch.nn.CrossEntropyLoss(),
        benchmark=bench,
        run=run,
        evaluator=make_evaluator(bench, interactive=False),
        device=torch.device("cpu"),
        plugins=list(plugins),
    )


@pytest.fixture(scope="module")
def bench():
    return split_digits(n_experiences=5, image_size=16, seed=0)


@pytest.mark.parametrize("name", strategy_names())
def test_strategy_contract(name, bench, tmp_path):
    spy = _LossSpy()
    strategy = _build(name, bench, tmp_path, plugins=[spy])
    before = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    strategy.train(bench.train_stream[0], eval_streams=[])
    res = strategy.eval(bench.test_stream[:1])
    # two classes: chance is 0.5
    assert res["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000"] > 0.7
    after = strategy.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    strategy.train(bench.train_stream[1], eval_streams=[])
    strategy.eval(bench.test_stream[:2])
    assert spy.losses and all(math.isfinite(v) for v in spy.losses)
    x = torch.stack([bench.test_stream[1].dataset[i][0] for i in range(8)])
    strategy.model.eval()
    with torch.no_grad():
        logits = strategy.model(x)
    assert torch.isfinite(logits).all()
    save_strategy(strategy, tmp_path / "ckpt.pkl")
    fresh, next_exp = load_strategy(_build(name, bench, tmp_path), tmp_path / "ckpt.pkl")
    assert next_exp == 2
    fresh.model.eval()
    with torch.no_grad():
        assert torch.equal(fresh.model(x), logits)
