"""Reading results as an Avalanche user does: :func:`final_metrics` on real tiny runs whatever the
benchmark's key names, and the public strategy constructors taking every keyword of Avalanche's
``SupervisedTemplate``."""

import inspect

import pytest
import torch
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.benchmarks.utils import as_classification_dataset
from avalanche.training import Naive
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from tiny_models import tiny_pixel_dreamer
from torch.utils.data import TensorDataset

from avalanche_d2l import D2L, Genifer, final_metrics
from avalanche_d2l.evaluation import FWT_STREAM, LAB_AVG_ACC, SEEN_ACC, make_evaluator
from avalanche_d2l.models import small_cnn
from avalanche_d2l.scenarios import split_digits
from avalanche_d2l.utils import seed_everything


def _blobs(n: int, gen: torch.Generator):
    """``n`` 8x8 grey images of 4 classes, class c around brightness c."""
    y = torch.arange(n) % 4
    x = torch.randn(n, 1, 8, 8, generator=gen) * 0.3 + y.view(-1, 1, 1, 1).float()
    data = TensorDataset(x, y)
    data.targets = y.tolist()
    return as_classification_dataset(data)


def _train(bench, n_classes: int):
    seed_everything(0)
    model = small_cnn(n_classes, 1, width=8)
    evaluator = make_evaluator(bench, interactive=False, timing=False)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), 1e-2),
        train_mb_size=16,
        eval_mb_size=64,
        evaluator=evaluator,
    )
    for exp in bench.train_stream[:2]:
        strategy.train(exp, eval_streams=[])
        res = strategy.eval(bench.test_stream)
    return strategy, res


@pytest.fixture(scope="module")
def with_task_labels():
    """split_digits: Avalanche's classic benchmark, keys end in ``/Task000``."""
    return _train(split_digits(n_experiences=5, image_size=8, seed=0), 10)


@pytest.fixture(scope="module")
def without_task_labels():
    """``class_incremental_benchmark`` (Avalanche 0.6): the same keys without ``/Task000``."""
    gen = torch.Generator().manual_seed(0)
    bench = class_incremental_benchmark(
        {"train": _blobs(80, gen), "test": _blobs(40, gen)}, num_experiences=2
    )
    return _train(bench, 4)


@pytest.mark.parametrize(
    ("run", "key"),
    [
        ("with_task_labels", "Top1_Acc_Stream/eval_phase/test_stream/Task000"),
        ("without_task_labels", "Top1_Acc_Stream/eval_phase/test_stream"),
    ],
)
def test_final_metrics_read_any_benchmarks_keys(run, key, request):
    strategy, res = request.getfixturevalue(run)
    assert key in res  # the key the README's quick start used to hard-code differs per benchmark
    evaluator = strategy.evaluator
    for source in (res, evaluator, evaluator.get_last_metrics(), evaluator.get_all_metrics()):
        got = final_metrics(source)
        assert got["accuracy"] == res[key]
        assert got["forward_transfer"] == res[FWT_STREAM]
        assert got["seen_accuracy"] == res[SEEN_ACC]
        assert got["lab_accuracy"] == res[LAB_AVG_ACC]


def test_final_metrics_of_another_stream_and_a_missing_one(with_task_labels):
    strategy, _ = with_task_labels
    bench = split_digits(n_experiences=5, image_size=8, seed=0)
    res = strategy.eval(bench.train_stream[:1])
    assert final_metrics(res, stream="train")["accuracy"] == pytest.approx(
        res["Top1_Acc_Stream/eval_phase/train_stream/Task000"]
    )
    with pytest.raises(ValueError, match=r"'valid' stream.*streams with one: \['test', 'train'\]"):
        final_metrics(res, stream="valid")


def test_final_metrics_falls_back_to_avalanches_forward_transfer():
    res = {
        "Top1_Acc_Stream/eval_phase/test_stream": 0.5,
        "StreamForwardTransfer/eval_phase/test_stream": 0.125,
    }
    got = final_metrics(res)
    assert got["accuracy"] == 0.5 and got["forward_transfer"] == 0.125
    assert got["lab_accuracy"] is None
    two_tasks = {
        "Top1_Acc_Stream/eval_phase/test_stream/Task000": 0.5,
        "Top1_Acc_Stream/eval_phase/test_stream/Task001": 0.7,
    }
    with pytest.raises(ValueError, match="several task labels"):
        final_metrics(two_tasks)


def _template_keywords(plugin, evaluator) -> dict:
    """A non-default value for every keyword of SupervisedTemplate (model/optimizer apart)."""
    values = {
        "criterion": torch.nn.CrossEntropyLoss(label_smoothing=0.1),
        "train_mb_size": 5,
        "train_epochs": 3,
        "eval_mb_size": 7,
        "device": "cpu",
        "plugins": [plugin],
        "evaluator": evaluator,
        "eval_every": 1,
        "peval_mode": "iteration",
    }
    params = inspect.signature(SupervisedTemplate.__init__).parameters
    expected = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} - {"model", "optimizer"}
    assert set(values) == expected  # a keyword Avalanche adds is added here too
    return values


def _d2l(**kw):
    model = small_cnn(10, 1, width=8)
    return D2L(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), 0.1),
        dreamer=tiny_pixel_dreamer(),
        **kw,
    )


def _genifer(**kw):
    model = small_cnn(10, 1, width=8)
    return Genifer(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), 0.1),
        feature_layer="block3",
        **kw,
    )


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_d2l, id="D2L"),
        pytest.param(_genifer, id="Genifer"),
    ],
)
def test_public_constructors_take_every_supervised_template_keyword(make):
    plugin = SupervisedPlugin()
    bench = split_digits(n_experiences=5, image_size=8, seed=0)
    evaluator = make_evaluator(bench, interactive=False)
    kw = _template_keywords(plugin, evaluator)
    strategy = make(**kw)
    assert strategy._criterion is kw["criterion"]
    assert (strategy.train_mb_size, strategy.train_epochs, strategy.eval_mb_size) == (5, 3, 7)
    assert strategy.evaluator is evaluator and plugin in strategy.plugins
    assert strategy.device == torch.device("cpu")
    # eval_every and peval_mode reach Avalanche's periodic evaluation plugin
    peval = [p for p in strategy.plugins if type(p).__name__ == "PeriodicEval"]
    assert len(peval) == 1 and peval[0].eval_every == 1 and peval[0].peval_mode == "iteration"
