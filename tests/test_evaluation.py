import pytest
import torch
from avalanche.training import Naive

from avalanche_d2l.evaluation import (
    AIA,
    AIA_WO_FIRST,
    FWT_STREAM,
    SEEN_ACC,
    close_evaluator,
    experience_accuracy,
    make_evaluator,
)
from avalanche_d2l.models import small_cnn
from avalanche_d2l.scenarios import split_digits


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    bench = split_digits(n_experiences=5, image_size=8, seed=0)
    model = small_cnn(10, 1, width=8)
    evaluator = make_evaluator(bench, interactive=False)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), 1e-2),
        train_mb_size=32,
        train_epochs=2,
        eval_mb_size=256,
        evaluator=evaluator,
    )
    per_exp, seen = [], []
    for exp in bench.train_stream[:3]:
        strategy.train(exp, eval_streams=[])
        res = strategy.eval(bench.test_stream)
        per_exp.append(
            [res[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"] for j in range(5)]
        )
        seen.append(res[SEEN_ACC])
    return bench, strategy, evaluator, per_exp, seen, res


def test_metric_keys(trained):
    *_, res = trained
    for key in [
        "Top1_Acc_Stream/eval_phase/test_stream/Task000",
        "Loss_Stream/eval_phase/test_stream/Task000",
        "StreamForgetting/eval_phase/test_stream",
        "StreamBWT/eval_phase/test_stream",
        "Time_Epoch/train_phase/train_stream/Task000",
        SEEN_ACC,
        AIA,
        FWT_STREAM,
    ]:
        assert key in res, key


def test_seen_class_accuracy_is_sample_weighted_over_trained_experiences(trained):
    bench, _, _, per_exp, seen, _ = trained
    sizes = [len(e.dataset) for e in bench.test_stream]
    for k in range(3):
        expected = sum(per_exp[k][j] * sizes[j] for j in range(k + 1)) / sum(sizes[: k + 1])
        assert seen[k] == pytest.approx(expected, abs=1e-6)


def test_average_incremental_accuracy_is_mean_of_seen_accuracies(trained):
    *_, seen, res = trained
    assert res[AIA] == pytest.approx(sum(seen) / len(seen))
    # the definition without the first experience (the reference Genifer code reports both)
    assert res[AIA_WO_FIRST] == pytest.approx(sum(seen[1:]) / len(seen[1:]))
    assert res[AIA_WO_FIRST] != pytest.approx(res[AIA])


def test_forward_transfer_is_accuracy_at_start_minus_random_init(trained):
    bench, strategy, evaluator, per_exp, _, res = trained
    fwt = next(m for m in evaluator.metrics if str(m) == "ForwardTransferAtStart")
    assert sorted(fwt.transfer) == [0, 1, 2]
    for k in range(3):
        assert fwt.transfer[k] == pytest.approx(
            fwt.accuracy_at_start[k] - fwt.random_init_accuracy[k]
        )
    # Naive predicts only classes it was trained on: before training on experience k (k >= 1)
    # the new classes are never predicted, so the accuracy at start is 0.
    assert fwt.accuracy_at_start[1] == 0.0 and fwt.accuracy_at_start[2] == 0.0
    assert res[FWT_STREAM] == pytest.approx((fwt.transfer[1] + fwt.transfer[2]) / 2)


class _LabelEcho(torch.nn.Module):
    """Outputs one-hot logits of `labels` (set from outside) -- a perfect predictor once set."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(10))
        self.labels = None

    def forward(self, x):
        if self.labels is None:
            return self.bias.expand(x.shape[0], 10)
        labels = self.labels.repeat(x.shape[0] // len(self.labels) + 1)[: x.shape[0]]
        return torch.nn.functional.one_hot(labels, 10).float() + self.bias


class _SetLabelsAtStart:
    """Plugin standing in for D2L's start-of-experience step (head assignment)."""

    def __init__(self, bench):
        self.bench = bench

    def before_training_exp(self, strategy, **kw):
        ds = self.bench.test_stream[strategy.experience.current_experience].dataset
        strategy.model.labels = torch.tensor([int(ds[i][1]) for i in range(len(ds))])


def test_forward_transfer_sees_start_of_experience_plugins():
    """User plugins' before_training_exp runs before the measurement."""
    bench = split_digits(n_experiences=5, image_size=8, seed=0)
    model = _LabelEcho()
    evaluator = make_evaluator(bench, interactive=False, eval_mb_size=10_000)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), 0.0),
        train_mb_size=10_000,
        train_epochs=1,
        evaluator=evaluator,
        plugins=[_SetLabelsAtStart(bench)],
    )
    strategy.train(bench.train_stream[0], eval_streams=[])
    fwt = next(m for m in evaluator.metrics if str(m) == "ForwardTransferAtStart")
    assert fwt.accuracy_at_start[0] == 1.0
    assert fwt.random_init_accuracy[0] < 0.6


def test_experience_accuracy_restores_training_mode():
    bench = split_digits(n_experiences=5, image_size=8)
    model = small_cnn(10, 1, width=8).train()
    experience_accuracy(model, bench.test_stream[0], "cpu")
    assert all(m.training for m in model.modules())


def test_make_evaluator_rejects_non_benchmark():
    with pytest.raises(ValueError, match="test_stream"):
        make_evaluator(object())


def test_loggers_on_request(tmp_path):
    bench = split_digits(n_experiences=5, image_size=8)
    ev = make_evaluator(
        bench,
        interactive=False,
        text_log=tmp_path / "log.txt",
        csv_dir=tmp_path / "csv",
        tensorboard_dir=tmp_path / "tb",
    )
    names = {type(lg).__name__ for lg in ev.loggers}
    assert {"TextLogger", "CSVLogger", "TensorboardLogger"} <= names
    assert "InteractiveLogger" in {type(lg).__name__ for lg in make_evaluator(bench).loggers}


def test_text_log_file_is_closed(tmp_path):
    import gc

    bench = split_digits(n_experiences=5, image_size=8)
    ev = make_evaluator(bench, interactive=False, text_log=tmp_path / "a.txt")
    f = next(lg.file for lg in ev.loggers if type(lg).__name__ == "TextLogger")
    assert not f.closed
    close_evaluator(ev)
    assert f.closed
    ev = make_evaluator(bench, interactive=False, text_log=tmp_path / "b.txt")
    f = next(lg.file for lg in ev.loggers if type(lg).__name__ == "TextLogger")
    del ev
    gc.collect()
    assert f.closed  # closed with the evaluator
