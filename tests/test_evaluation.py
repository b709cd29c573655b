import pytest
import torch
from avalanche.training import Naive

from avalanche_d2l.evaluation import (
    AIA,
    AIA_WO_FIRST,
    FWT_STREAM,
    LAB_ACC_EXP,
    LAB_ACC_STREAM,
    LAB_AVG_ACC,
    LAB_FWT_STREAM,
    SEEN_ACC,
    ForwardTransferAtStart,
    close_evaluator,
    experience_accuracy,
    lab_correct,
    lab_target_heads,
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


# ---- the two protocols on a hand-made case -----------------------------------------------------
#
# Inputs are the logits themselves: x = (N, 1, 1, 5) -> 5 head logits. 4 classes, 5 heads (one
# dream-only head, 4). Experience 0 = classes {0, 1}, experience 1 = classes {2, 3}; heads are
# assigned at the start of each experience: 0 -> 0, 1 -> 1, then 2 -> 3, 3 -> 2 (head 4 keeps
# its dream). The learning rate is 0, so every accuracy below is known in advance.

N_HEADS = 5
ASSIGN = {0: {0: 0, 1: 1}, 1: {2: 3, 3: 2}}


def _logits(order: list[int]) -> list[float]:
    """Head logits whose ranking is ``order`` (best first)."""
    out = [0.0] * N_HEADS
    for rank, h in enumerate(order):
        out[h] = float(N_HEADS - rank)
    return out


# (class, head ranking) of every test sample: (lab correct?, masked correct?) in the comment
TEST_SAMPLES = [
    (0, [0, 1]),  # yes, yes
    (0, [4, 0]),  # no (dream head 4 wins), yes (head 4 masked)
    (1, [1, 0]),  # yes, yes
    (1, [4, 1]),  # no, yes
    (1, [0, 1]),  # no, no
    (0, [0, 4]),  # yes, yes
    (2, [3, 2]),  # yes, yes (class 2 has head 3)
    (3, [2, 3]),  # yes, yes (class 3 has head 2)
    (2, [4, 3, 2]),  # no, yes
]
LAB = {0: 3 / 6, 1: 2 / 3}
MASKED = {0: 5 / 6, 1: 3 / 3}


class _TableHeads(torch.nn.Module):
    """A head model in the DreamHeads sense (``forward_heads`` + ``class_to_head``), whose head
    logits are its input. ``forward`` is the masked class space (identity before assignment)."""

    def __init__(self, n_classes: int = 4):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(N_HEADS))
        self.register_buffer("class_to_head", torch.full((n_classes,), -1, dtype=torch.long))

    def forward_heads(self, x):
        return x.flatten(1) + self.w

    def forward(self, x):
        heads = self.forward_heads(x)
        if not bool((self.class_to_head >= 0).any()):
            return heads[:, : len(self.class_to_head)]
        out = heads[:, self.class_to_head.clamp(min=0)]
        return out.masked_fill(self.class_to_head.unsqueeze(0) < 0, -1e4)


class _Table(torch.nn.Module):
    """A plain model whose 4 logits are its input's first 4 values."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return x.flatten(1)[:, :4] + self.w


class _AssignHeads:
    """Stand-in for D2L's head assignment at the start of each experience."""

    def before_training_exp(self, strategy, **kw):
        k = strategy.experience.current_experience
        model = strategy.model
        if hasattr(model, "class_to_head"):
            for c, h in ASSIGN[k].items():
                model.class_to_head[c] = h


def _table_run(model):
    from avalanche_d2l.scenarios import tensor_benchmark

    x = torch.tensor([_logits(order) for _, order in TEST_SAMPLES]).view(-1, 1, 1, N_HEADS)
    y = torch.tensor([c for c, _ in TEST_SAMPLES])
    bench = tensor_benchmark(x, y, x, y, n_experiences=2, class_order=[0, 1, 2, 3])
    evaluator = make_evaluator(bench, interactive=False, timing=False)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        train_mb_size=4,
        train_epochs=1,
        eval_mb_size=4,  # several minibatches per experience
        evaluator=evaluator,
        plugins=[_AssignHeads()],
    )
    results = []
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[])
        results.append(strategy.eval(bench.test_stream))
    fwt = next(m for m in evaluator.metrics if isinstance(m, ForwardTransferAtStart))
    return results, fwt


def test_lab_and_masked_protocols_on_a_hand_made_head_model():
    results, fwt = _table_run(_TableHeads())
    res = results[-1]
    for j in (0, 1):
        assert res[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"] == pytest.approx(
            MASKED[j]
        )
        assert res[LAB_ACC_EXP.format(j)] == pytest.approx(LAB[j])
    # lab final accuracy: the mean of the per-experience accuracies, not sample-weighted
    assert res[LAB_AVG_ACC] == pytest.approx((3 / 6 + 2 / 3) / 2)
    assert res[LAB_ACC_STREAM] == pytest.approx(5 / 9)
    assert res[SEEN_ACC] == pytest.approx(8 / 9)  # masked, sample-weighted
    # after experience 0 only experience 0 counts (experience 1's classes have no head yet:
    # their samples are all wrong under the lab protocol)
    assert results[0][LAB_AVG_ACC] == pytest.approx(3 / 6)
    assert results[0][LAB_ACC_EXP.format(1)] == 0.0
    # forward transfer: the random-init model (no head assigned: identity map) gets every
    # experience-1 sample wrong under both protocols; at the start of experience 1 (after the
    # assignment) the masked protocol finds 3 of 3, the lab protocol 2 of 3 (one sample on the
    # dream head)
    assert fwt.random_init_accuracy[1] == 0.0 and fwt.lab_random_init_accuracy[1] == 0.0
    assert fwt.accuracy_at_start[1] == pytest.approx(1.0)
    assert fwt.lab_accuracy_at_start[1] == pytest.approx(2 / 3)
    assert res[FWT_STREAM] == pytest.approx(1.0)
    assert res[LAB_FWT_STREAM] == pytest.approx(2 / 3)
    # random init, experience 0, identity map: lab over 5 heads, masked over the first 4
    assert fwt.lab_random_init_accuracy[0] == pytest.approx(3 / 6)
    assert fwt.random_init_accuracy[0] == pytest.approx(5 / 6)


def test_plain_model_protocols_differ_only_in_the_mean_over_experiences():
    results, fwt = _table_run(_Table())
    res = results[-1]
    per_exp = [res[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"] for j in (0, 1)]
    assert [res[LAB_ACC_EXP.format(j)] for j in (0, 1)] == pytest.approx(per_exp)
    # a plain model reads the first 4 units: head 4 does not exist for it, and the samples of
    # classes 2 and 3 (ranked for their assigned heads 3 and 2) are all wrong
    assert per_exp == pytest.approx([5 / 6, 0.0])
    assert res[LAB_AVG_ACC] == pytest.approx((5 / 6 + 0.0) / 2)  # per-experience mean
    assert res[SEEN_ACC] == pytest.approx(5 / 9)  # sample-weighted
    assert fwt.lab_transfer == pytest.approx(fwt.transfer)


def test_a_class_without_a_head_is_wrong_under_the_lab_protocol():
    model = _TableHeads()
    x = torch.tensor([_logits([1, 0]), _logits([4, 2])])
    y = torch.tensor([1, 2])
    # before any assignment the map is the identity: class 1 on head 1 is right, class 2 on
    # head 4 (beyond the classes) wrong
    assert lab_correct(model, x, y).tolist() == [True, False]
    model.class_to_head[0] = 0
    assert lab_target_heads(model, y).tolist() == [-1, -1]
    assert lab_correct(model, x, y).tolist() == [False, False]
    model.class_to_head[1] = 1
    assert lab_correct(model, x, y).tolist() == [True, False]
    with pytest.raises(ValueError, match="protocol"):
        experience_accuracy(model, None, "cpu", protocol="top5")
