"""The evaluation loss stays on Naive's scale for every registered strategy, also where the model
masks out the classes it has no head for (D2L's ``DreamHeads``, Genifer's inactive classes give
them a -1e4 logit, which used to make ``Loss_Stream`` about 5,000 where Naive logs 2-3).

Each strategy trains experience 0 of split_digits and is evaluated on experiences 0 and 1, so
half the test samples belong to classes it has not trained yet."""

import pytest
import torch
import torch.nn.functional as F
from avalanche.evaluation.metrics import loss_metrics
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from tiny_models import tiny_pixel_dreamer

from avalanche_d2l.evaluation import MASKED_LOGIT, make_evaluator, rank_masked_last
from avalanche_d2l.models import small_cnn
from avalanche_d2l.registry import RunConfig, build_strategy, get_strategy, strategy_names
from avalanche_d2l.scenarios import split_digits
from avalanche_d2l.utils import seed_everything

STREAM = "Loss_Stream/eval_phase/test_stream/Task000"
UNSEEN = "Loss_Exp/eval_phase/test_stream/Task000/Exp001"  # classes not trained yet
FACTOR = 3.0


@pytest.fixture(scope="module")
def bench():
    return split_digits(n_experiences=5, image_size=16, seed=0)


@pytest.fixture(scope="module")
def dreamer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dreamer") / "tiny"
    tiny_pixel_dreamer().save_pretrained(path)
    return path


def _eval_losses(name, bench, dreamer_dir, work) -> dict:
    seed_everything(0)
    model = small_cnn(10, 1, width=16)
    config_type = get_strategy(name).config_type
    fields = getattr(config_type, "__dataclass_fields__", {})
    config = {"dreamer": str(dreamer_dir)} if "dreamer" in fields else None
    run = RunConfig(epochs=2, train_mb_size=32, mem_size=40, quick=True, seed=0, work_dir=str(work))
    strategy = build_strategy(
        name,
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), 3e-3),
        criterion=torch.nn.CrossEntropyLoss(),
        benchmark=bench,
        run=run,
        config=config,
        evaluator=make_evaluator(bench, interactive=False, timing=False),
        device=torch.device("cpu"),
    )
    strategy.train(bench.train_stream[0], eval_streams=[])
    return strategy.eval(bench.test_stream[:2])


@pytest.fixture(scope="module")
def naive(bench, dreamer_dir, tmp_path_factory):
    return _eval_losses("naive", bench, dreamer_dir, tmp_path_factory.mktemp("naive"))


@pytest.mark.parametrize("name", strategy_names())
def test_logged_eval_loss_is_within_a_small_factor_of_naives(
    name, bench, dreamer_dir, naive, tmp_path
):
    res = _eval_losses(name, bench, dreamer_dir, tmp_path)
    for key in (STREAM, UNSEEN):
        assert naive[key] / FACTOR < res[key] < naive[key] * FACTOR, (key, res[key], naive[key])


def test_without_masked_classes_the_loss_is_avalanches(bench):
    """Two doors: make_evaluator's loss and Avalanche's own loss metrics log the same values."""
    seed_everything(0)
    model = small_cnn(10, 1, width=8)
    ours = make_evaluator(bench, interactive=False, timing=False)
    theirs = EvaluationPlugin(loss_metrics(experience=True, stream=True), loggers=[])
    strategy = Naive(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), 3e-3),
        train_mb_size=32,
        eval_mb_size=64,
        evaluator=ours,
        plugins=[theirs],  # a second evaluator as a plugin sees the same mini-batches
    )
    strategy.train(bench.train_stream[0], eval_streams=[])
    res = strategy.eval(bench.test_stream[:2])
    for key in (STREAM, UNSEEN):
        assert res[key] == pytest.approx(theirs.get_last_metrics()[key], rel=1e-6)


def test_masked_classes_are_ranked_last():
    logits = torch.tensor([[2.0, -1e4, 0.5, 1.0], [-1e4, -1e4, -1e4, -1e4]])
    ranked = rank_masked_last(logits)
    assert torch.equal(ranked, torch.tensor([[2.0, 0.5, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    # a sample of a masked class costs what a sample of the lowest-scored class costs
    y = torch.tensor([1, 2])
    per_sample = F.cross_entropy(ranked, y, reduction="none")
    assert per_sample[0] == pytest.approx(float(F.cross_entropy(ranked[:1], torch.tensor([2]))))
    assert per_sample[1] == pytest.approx(float(torch.log(torch.tensor(4.0))))


def test_the_masks_of_d2l_and_genifer_are_recognised():
    from avalanche_d2l.d2l.heads import MASK_VALUE as D2L_MASK
    from avalanche_d2l.genifer.parts import MASK_VALUE as GENIFER_MASK

    assert D2L_MASK <= MASKED_LOGIT and GENIFER_MASK <= MASKED_LOGIT
