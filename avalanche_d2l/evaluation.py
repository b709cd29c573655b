"""Evaluation: one :class:`EvaluationPlugin` with the metrics continual-learning papers report.

:func:`make_evaluator` combines Avalanche's accuracy, loss, forgetting, BWT and timing metrics with
two metrics of ours:

* :class:`AverageIncrementalAccuracy` -- after each training experience, the accuracy on the test
  samples of all classes seen so far; the mean of these values over experiences (the headline metric
  of Genifer and of the GFR protocol), and the same mean without experience 0 (the authors'
  Genifer code reports both: with a large first task the first value dominates otherwise).
* :class:`ForwardTransferAtStart` -- accuracy on experience k measured at the start of its training,
  *after* the strategy's own start-of-experience step (D2L assigns heads there) and before the first
  update, minus the accuracy of a random-initialised copy of the model on the same experience; the
  stream value is the mean over k >= 1 (0-based). For a strategy with no start-of-experience step
  it equals Avalanche's forward transfer, but it evaluates the test experience itself, so the user
  needs no periodic evaluation on the test stream.

Both read the benchmark's test stream passed to :func:`make_evaluator`.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
import weakref
from collections.abc import Sequence

import torch
from avalanche.evaluation.metric_definitions import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.evaluation.metrics import (
    accuracy_metrics,
    bwt_metrics,
    forgetting_metrics,
    loss_metrics,
    timing_metrics,
)
from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin
from torch.utils.data import DataLoader

from .utils import training_mode

__all__ = [
    "make_evaluator",
    "close_evaluator",
    "AverageIncrementalAccuracy",
    "ForwardTransferAtStart",
    "experience_accuracy",
    "SEEN_ACC",
    "AIA",
    "AIA_WO_FIRST",
    "FWT_STREAM",
]

SEEN_ACC = "Top1_Acc_SeenClasses/eval_phase/test_stream"
AIA = "AverageIncrementalAccuracy/eval_phase/test_stream"
AIA_WO_FIRST = "AverageIncrementalAccuracyWithoutFirst/eval_phase/test_stream"
FWT_STREAM = "ForwardTransferAtStart/train_phase/test_stream"
FWT_EXP = "ForwardTransferAtStart_Exp/train_phase/test_stream/Exp{:03d}"
ACC_AT_START = "Top1_Acc_AtStart_Exp/train_phase/test_stream/Exp{:03d}"


@torch.no_grad()
def experience_accuracy(model: torch.nn.Module, experience, device, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``experience`` (eval transforms, eval mode, no grad).

    The model's training mode is restored afterwards.
    """
    loader = DataLoader(experience.dataset.eval(), batch_size=batch_size, shuffle=False)
    correct, total = 0, 0
    with training_mode(model, False):
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += int(y.numel())
    return correct / max(total, 1)


class AverageIncrementalAccuracy(PluginMetric[float]):
    """Accuracy on the classes seen so far, and its mean over training experiences.

    After training experience k, any evaluation on the test stream (outside the training of the
    next experience) gives the accuracy on the test samples whose class was in experiences 0..k.
    The value recorded for k is the last such evaluation; the average incremental accuracy is the
    mean of the recorded values.
    """

    def __init__(self, stream_name: str = "test"):
        super().__init__()
        self.stream_name = stream_name
        self.seen_classes: set[int] = set()
        self.history: dict[int, float] = {}
        self._n_trained = 0
        self._in_experience = False
        self._correct = 0
        self._total = 0

    def reset(self) -> None:
        self._correct, self._total = 0, 0

    def result(self) -> float | None:
        if not self.history:
            return None
        return sum(self.history.values()) / len(self.history)

    def result_without_first(self) -> float | None:
        """The mean over experiences 1.. (0-based): leaves out the accuracy after the first."""
        later = [v for k, v in self.history.items() if k >= 2]
        return sum(later) / len(later) if later else None

    def before_training_exp(self, strategy):
        self._in_experience = True

    def after_training_exp(self, strategy):
        self.seen_classes.update(int(c) for c in strategy.experience.classes_in_this_experience)
        self._n_trained += 1
        self._in_experience = False

    def before_eval(self, strategy):
        self.reset()

    def after_eval_iteration(self, strategy):
        if strategy.experience.origin_stream.name != self.stream_name or not self.seen_classes:
            return
        y = strategy.mb_y
        seen = torch.tensor(sorted(self.seen_classes), device=y.device)
        keep = torch.isin(y, seen)
        if keep.any():
            pred = strategy.mb_output.argmax(dim=1)
            self._correct += int((pred[keep] == y[keep]).sum())
            self._total += int(keep.sum())

    def after_eval(self, strategy):
        if self._total == 0 or self._in_experience:
            return None
        seen_acc = self._correct / self._total
        self.history[self._n_trained] = seen_acc
        x = strategy.clock.train_iterations
        values = [
            MetricValue(self, SEEN_ACC, seen_acc, x),
            MetricValue(self, AIA, self.result(), x),
        ]
        if self.result_without_first() is not None:
            values.append(MetricValue(self, AIA_WO_FIRST, self.result_without_first(), x))
        return values

    def __str__(self) -> str:
        return "AverageIncrementalAccuracy"


class ForwardTransferAtStart(PluginMetric[float]):
    """Forward transfer measured at the start of each training experience.

    Args:
        test_stream: the benchmark's test stream; experience k of training is compared with
            experience k of this stream.
        eval_mb_size: batch size for these evaluations.
    """

    def __init__(self, test_stream, eval_mb_size: int = 256):
        super().__init__()
        self.test_stream = test_stream
        self.eval_mb_size = eval_mb_size
        self.random_init_accuracy: dict[int, float] = {}
        self.accuracy_at_start: dict[int, float] = {}
        self.transfer: dict[int, float] = {}

    def reset(self) -> None:
        pass

    def result(self) -> float | None:
        later = [v for k, v in self.transfer.items() if k >= 1]
        return sum(later) / len(later) if later else None

    def before_training(self, strategy):
        if self.random_init_accuracy:
            return None
        # A copy of the model before any training: the reference of forward transfer.
        reference = copy.deepcopy(strategy.model).to(strategy.device)
        for exp in self.test_stream:
            self.random_init_accuracy[exp.current_experience] = experience_accuracy(
                reference, exp, strategy.device, self.eval_mb_size
            )
        del reference
        return None

    def before_training_exp(self, strategy):
        k = strategy.experience.current_experience
        if k not in self.random_init_accuracy:
            raise RuntimeError(
                f"ForwardTransferAtStart has no random-init accuracy for experience {k}: the "
                "training experience does not belong to the test stream given to make_evaluator"
            )
        # Plugins' before_training_exp hooks (e.g. D2L head assignment) have already run:
        # the evaluator comes after the user plugins in strategy.plugins.
        acc = experience_accuracy(
            strategy.model, self.test_stream[k], strategy.device, self.eval_mb_size
        )
        self.accuracy_at_start[k] = acc
        self.transfer[k] = acc - self.random_init_accuracy[k]
        x = strategy.clock.train_iterations
        values = [
            MetricValue(self, ACC_AT_START.format(k), acc, x),
            MetricValue(self, FWT_EXP.format(k), self.transfer[k], x),
        ]
        if self.result() is not None:
            values.append(MetricValue(self, FWT_STREAM, self.result(), x))
        return values

    def __str__(self) -> str:
        return "ForwardTransferAtStart"


def make_evaluator(
    benchmark,
    loggers: Sequence | None = None,
    *,
    interactive: bool = True,
    text_log: str | os.PathLike | None = None,
    csv_dir: str | os.PathLike | None = None,
    tensorboard_dir: str | os.PathLike | None = None,
    timing: bool = True,
    eval_mb_size: int = 256,
) -> EvaluationPlugin:
    """One :class:`EvaluationPlugin` with accuracy, loss, forgetting, BWT, forward transfer,
    timing and average incremental accuracy.

    Args:
        benchmark: the Avalanche benchmark; its ``test_stream`` is used for forward transfer.
        loggers: extra Avalanche loggers (added to the ones below).
        interactive: show Avalanche's interactive (progress-bar) logger.
        text_log: path of a text log file (appended to; closed when the evaluator is
            garbage-collected, or by :func:`close_evaluator`).
        csv_dir: folder for Avalanche's CSV logger.
        tensorboard_dir: folder for TensorBoard event files.
        timing: include epoch/experience timing metrics.
        eval_mb_size: batch size of the forward-transfer evaluations.
    """
    if not hasattr(benchmark, "test_stream"):
        raise ValueError(
            "make_evaluator needs an Avalanche benchmark with a test_stream, e.g. "
            "avalanche_d2l.scenarios.split_digits(); got " + type(benchmark).__name__
        )
    all_loggers = list(loggers or [])
    if interactive:
        all_loggers.append(InteractiveLogger())
    log_file = None
    if text_log is not None:
        os.makedirs(os.path.dirname(os.path.abspath(text_log)), exist_ok=True)
        log_file = open(text_log, "a")  # noqa: SIM115 -- owned by the evaluator, closed below
        all_loggers.append(TextLogger(log_file))
    if csv_dir is not None:
        all_loggers.append(CSVLogger(log_folder=str(csv_dir)))
    if tensorboard_dir is not None:
        all_loggers.append(TensorboardLogger(tb_log_dir=str(tensorboard_dir)))
    metrics = [
        accuracy_metrics(epoch=True, experience=True, stream=True),
        loss_metrics(epoch=True, experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        AverageIncrementalAccuracy(),
        ForwardTransferAtStart(benchmark.test_stream, eval_mb_size=eval_mb_size),
    ]
    if timing:
        metrics.append(timing_metrics(epoch=True, experience=True))
    with warnings.catch_warnings():
        # Without loggers Avalanche warns that nothing is logged; the metrics are still collected
        # and returned by strategy.eval(), which is what a non-interactive run wants.
        warnings.filterwarnings("ignore", message="No loggers specified")
        evaluator = EvaluationPlugin(*metrics, loggers=all_loggers, collect_all=True)
    if log_file is not None:
        # the file is closed with the evaluator (garbage collection or interpreter exit), or
        # earlier by close_evaluator(); nothing is stored on the evaluator, so it still pickles
        weakref.finalize(evaluator, log_file.close)
    return evaluator


def close_evaluator(evaluator: EvaluationPlugin) -> None:
    """Close the files of the evaluator's text loggers (not the standard streams)."""
    for logger in evaluator.loggers:
        f = getattr(logger, "file", None)
        if (
            isinstance(logger, TextLogger)
            and f not in (None, sys.stdout, sys.stderr)
            and hasattr(f, "close")
        ):
            f.close()
