"""Evaluation: one :class:`EvaluationPlugin` with the metrics continual-learning papers report,
and :func:`final_metrics` to read the headline numbers back.

:func:`make_evaluator` combines Avalanche's accuracy, loss, forgetting, BWT and timing metrics with
metrics of ours, under two protocols:

* **lab** -- the protocol of the D2L authors' code (``papers/d2l.md`` A2, B): a prediction is the
  argmax over *all* output units of the model. For a model with head slots (``forward_heads`` and a
  ``class_to_head`` buffer, e.g. D2L's ``DreamHeads``) that includes the heads that host only a
  dream, so a sample landing on one is an error; a class without a head is always wrong. Final
  accuracy is the mean of the per-experience accuracies over the experiences trained so far.
* **masked** -- the model's own output (``model(x)``; for ``DreamHeads`` the class space, where
  heads that host only a dream are masked out). Final accuracy is the accuracy on all test samples
  of the classes seen so far (sample-weighted).

For a plain classifier the two give the same per-experience accuracies; they differ only in how
the final accuracy averages them (per experience vs per sample). The metrics of ours:

* :class:`LabAccuracy` -- per test experience and stream accuracy under the lab protocol, and
  its mean over the experiences trained so far (:data:`LAB_AVG_ACC`, the lab's final accuracy).
* :class:`AverageIncrementalAccuracy` -- (masked) after each training experience, the accuracy on
  the test samples of all classes seen so far; the mean of these values over experiences (the
  headline metric of Genifer and of the GFR protocol), and the same mean without experience 0
  (the authors' Genifer code reports both: with a large first task the first value dominates).
* :class:`ForwardTransferAtStart` -- accuracy on experience k measured at the start of its
  training, *after* the strategy's own start-of-experience step (D2L assigns heads there) and
  before the first update, minus the accuracy of a random-initialised copy of the model on the
  same experience; the stream value is the mean over k >= 1 (0-based; Mammoth's formula). Both
  protocols are measured in one pass (:data:`FWT_STREAM`, :data:`LAB_FWT_STREAM`). For a strategy
  with no start-of-experience step it equals Avalanche's forward transfer, but it evaluates the
  test experience itself, so the user needs no periodic evaluation on the test stream.

The metrics of ours live in :mod:`avalanche_d2l.metrics` (importable from here too), with
how the evaluation loss treats the classes a model masks out.

:func:`final_metrics` reads the final accuracy and forward transfer from an evaluator or its
metrics dict, whatever the benchmark calls its streams and whether its keys carry task labels.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
import weakref
from collections.abc import Sequence

from avalanche.evaluation.metrics import (
    accuracy_metrics,
    bwt_metrics,
    forgetting_metrics,
    loss_metrics,
    timing_metrics,
)
from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin

from .metrics import (
    ACC_AT_START,
    AIA,
    AIA_WO_FIRST,
    FWT_EXP,
    FWT_STREAM,
    LAB_ACC_AT_START,
    LAB_ACC_EXP,
    LAB_ACC_STREAM,
    LAB_AVG_ACC,
    LAB_FWT_EXP,
    LAB_FWT_STREAM,
    MASKED_LOGIT,
    SEEN_ACC,
    AverageIncrementalAccuracy,
    ForwardTransferAtStart,
    LabAccuracy,
    MaskAwareExperienceLoss,
    MaskAwareStreamLoss,
    evaluation_loss,
    experience_accuracy,
    lab_correct,
    lab_target_heads,
    rank_masked_last,
)

__all__ = [
    "make_evaluator",
    "close_evaluator",
    "final_metrics",
    "AverageIncrementalAccuracy",
    "ForwardTransferAtStart",
    "LabAccuracy",
    "evaluation_loss",
    "experience_accuracy",
    "lab_correct",
    "lab_target_heads",
    "rank_masked_last",
    "MASKED_LOGIT",
    "SEEN_ACC",
    "AIA",
    "AIA_WO_FIRST",
    "FWT_STREAM",
    "FWT_EXP",
    "ACC_AT_START",
    "LAB_ACC_EXP",
    "LAB_ACC_STREAM",
    "LAB_AVG_ACC",
    "LAB_FWT_STREAM",
    "LAB_FWT_EXP",
    "LAB_ACC_AT_START",
]


def _metrics_dict(source) -> dict:
    """``{name: last value}`` from an evaluator, ``get_last_metrics()`` or ``get_all_metrics()``."""
    if hasattr(source, "get_last_metrics"):
        return dict(source.get_last_metrics())
    if not isinstance(source, dict):
        raise TypeError(
            "final_metrics needs an EvaluationPlugin (strategy.evaluator) or the dict that "
            f"strategy.eval() returns; got {type(source).__name__}"
        )
    out = {}
    for name, value in source.items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], list):
            value = value[1][-1] if value[1] else None  # get_all_metrics(): (xs, values)
        out[name] = value
    return out


def _stream_value(metrics: dict, metric: str, stream: str) -> float | None:
    """The value of ``metric/<phase>/<stream>_stream[/TaskNNN]``; ``None`` when absent."""
    pattern = re.compile(rf"^{re.escape(metric)}/\w+_phase/{re.escape(stream)}_stream(/Task\d+)?$")
    found = {name: v for name, v in metrics.items() if pattern.match(name) and v is not None}
    if len(found) > 1:
        raise ValueError(
            f"{metric} of {stream}_stream is logged under several task labels ({sorted(found)}): "
            "read the key you want from the metrics dict"
        )
    return float(next(iter(found.values()))) if found else None


def final_metrics(source, *, stream: str = "test") -> dict[str, float | None]:
    """Final accuracy and forward transfer, whatever the benchmark's stream and task key names.

    Args:
        source: the evaluator (``strategy.evaluator``), the dict ``strategy.eval()`` returns
            (``evaluator.get_last_metrics()``), or ``evaluator.get_all_metrics()``.
        stream: the name of the evaluated stream (``"test"`` for ``benchmark.test_stream``).

    Returns:
        ``accuracy``: Avalanche's ``Top1_Acc_Stream`` of the last evaluation on ``stream``
        (``Top1_Acc_Stream/eval_phase/test_stream`` with or without a ``/Task000`` suffix);
        ``forward_transfer``: :data:`FWT_STREAM` (:func:`make_evaluator`), else Avalanche's
        ``StreamForwardTransfer`` of ``stream``; ``seen_accuracy``,
        ``average_incremental_accuracy``, ``lab_accuracy`` (:data:`LAB_AVG_ACC`) and
        ``lab_forward_transfer``: the metrics of :mod:`avalanche_d2l.metrics`. A metric the
        evaluator does not compute (or not yet: forward transfer needs a second experience) is
        ``None``.

    Raises:
        ValueError: no stream accuracy of ``stream`` was logged (the message names the streams
            that have one), or it was logged under several task labels.
    """
    metrics = _metrics_dict(source)
    accuracy = _stream_value(metrics, "Top1_Acc_Stream", stream)
    if accuracy is None:
        names = sorted(
            {
                m.group(1)
                for n in metrics
                if (m := re.match(r"^Top1_Acc_Stream/eval_phase/(.+)_stream", n))
            }
        )
        raise ValueError(
            f"no Top1_Acc_Stream of the {stream!r} stream was logged (streams with one: "
            f"{names or 'none'}): evaluate with accuracy_metrics(stream=True) (make_evaluator "
            "has it), call strategy.eval(<stream>) first, and pass stream=<its name>"
        )
    fwt = metrics.get(FWT_STREAM)
    if fwt is None:
        fwt = _stream_value(metrics, "StreamForwardTransfer", stream)

    def get(key):
        return None if metrics.get(key) is None else float(metrics[key])

    return {
        "accuracy": accuracy,
        "forward_transfer": None if fwt is None else float(fwt),
        "seen_accuracy": get(SEEN_ACC),
        "average_incremental_accuracy": get(AIA),
        "lab_accuracy": get(LAB_AVG_ACC),
        "lab_forward_transfer": get(LAB_FWT_STREAM),
    }


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
    timing and average incremental accuracy; accuracy and forward transfer also under the lab
    protocol (:class:`LabAccuracy`, :class:`ForwardTransferAtStart`; see the module docstring).
    The evaluation loss ranks masked-out classes last (:func:`evaluation_loss`).

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
    # our per-stream metrics read the test stream under the name the benchmark gives it
    test_name = getattr(benchmark.test_stream, "name", "test")
    metrics = [
        accuracy_metrics(epoch=True, experience=True, stream=True),
        loss_metrics(epoch=True),  # training loss: Avalanche's; evaluation loss: mask-aware
        MaskAwareExperienceLoss(),
        MaskAwareStreamLoss(),
        forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        AverageIncrementalAccuracy(test_name),
        LabAccuracy(test_name),
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
