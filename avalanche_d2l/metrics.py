"""The metrics of ours that :func:`avalanche_d2l.evaluation.make_evaluator` adds to Avalanche's,
under two protocols:

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

They read the benchmark's test stream passed to ``make_evaluator``; experience k of the
training stream is compared with experience k of the test stream (class-incremental streams).

The evaluation loss (``Loss_Exp``, ``Loss_Stream``) is Avalanche's, except where the model masks
classes out with a huge negative logit (D2L's classes without a head, Genifer's inactive
classes): there a sample of a masked class would cost about 10,000, so the loss is computed with
each masked class ranked last instead (:func:`rank_masked_last`), finite and on Naive's scale.
"""

from __future__ import annotations

import copy

import torch
from avalanche.evaluation.metric_definitions import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.evaluation.metrics import ExperienceLoss, StreamLoss
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .utils import training_mode

__all__ = [
    "AverageIncrementalAccuracy",
    "ForwardTransferAtStart",
    "LabAccuracy",
    "MaskAwareExperienceLoss",
    "MaskAwareStreamLoss",
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

# masked protocol (the model's own output)
SEEN_ACC = "Top1_Acc_SeenClasses/eval_phase/test_stream"
AIA = "AverageIncrementalAccuracy/eval_phase/test_stream"
AIA_WO_FIRST = "AverageIncrementalAccuracyWithoutFirst/eval_phase/test_stream"
FWT_STREAM = "ForwardTransferAtStart/train_phase/test_stream"
FWT_EXP = "ForwardTransferAtStart_Exp/train_phase/test_stream/Exp{:03d}"
ACC_AT_START = "Top1_Acc_AtStart_Exp/train_phase/test_stream/Exp{:03d}"
# lab protocol (argmax over all output units; final accuracy = mean over experiences)
LAB_ACC_EXP = "LabTop1_Acc_Exp/eval_phase/test_stream/Exp{:03d}"
LAB_ACC_STREAM = "LabTop1_Acc_Stream/eval_phase/test_stream"
LAB_AVG_ACC = "LabAvgAcc_TrainedExps/eval_phase/test_stream"
LAB_FWT_STREAM = "LabForwardTransferAtStart/train_phase/test_stream"
LAB_FWT_EXP = "LabForwardTransferAtStart_Exp/train_phase/test_stream/Exp{:03d}"
LAB_ACC_AT_START = "LabTop1_Acc_AtStart_Exp/train_phase/test_stream/Exp{:03d}"

PROTOCOLS = ("masked", "lab")

#: A logit at or below this marks a class the model masked out (D2L's classes without a head and
#: Genifer's inactive classes get -1e4); no trained classifier scores a real class this low.
MASKED_LOGIT = -1e3


def _head_model(model: torch.nn.Module):
    """The model's head-slot view (``forward_heads`` + ``class_to_head``), or ``None``.

    Duck-typed, so any module with the two attributes is evaluated per head (also inside a
    ``DistributedDataParallel``-style ``.module`` wrapper).
    """
    for m in (model, getattr(model, "module", None)):
        if m is not None and hasattr(m, "forward_heads") and hasattr(m, "class_to_head"):
            return m
    return None


def lab_target_heads(model: torch.nn.Module, y: Tensor) -> Tensor:
    """The output unit each label must win under the lab protocol.

    ``class_to_head[y]`` for a head model (``-1``, i.e. never a winner, for a class without a
    head); before any class has a head the map is the identity, as in ``DreamHeads.forward``.
    A plain model: ``y`` itself.
    """
    heads = _head_model(model)
    if heads is None:
        return y
    c2h = heads.class_to_head.to(y.device)
    if not bool((c2h >= 0).any()):
        return y
    return c2h[y]


@torch.no_grad()
def lab_correct(model: torch.nn.Module, x: Tensor, y: Tensor, output: Tensor | None = None):
    """Per-sample correctness under the lab protocol: argmax over all output units.

    A head model is read through ``forward_heads(x)`` (all heads, dream-only heads included); any
    other model through ``output`` (its logits on ``x`` when already computed, e.g. the
    strategy's ``mb_output`` with its plugins' corrections) or ``model(x)``.
    """
    heads = _head_model(model)
    if heads is not None:
        logits = heads.forward_heads(x)
    else:
        logits = model(x) if output is None else output
    return logits.argmax(dim=1) == lab_target_heads(model, y)


@torch.no_grad()
def _experience_accuracies(model, experience, device, batch_size: int) -> dict[str, float]:
    """``{"masked": ..., "lab": ...}`` accuracies of ``model`` on ``experience`` in one pass."""
    loader = DataLoader(experience.dataset.eval(), batch_size=batch_size, shuffle=False)
    masked, lab, total = 0, 0, 0
    with training_mode(model, False):
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            out = model(x)
            masked += int((out.argmax(dim=1) == y).sum())
            lab += int(lab_correct(model, x, y, out).sum())
            total += int(y.numel())
    total = max(total, 1)
    return {"masked": masked / total, "lab": lab / total}


def experience_accuracy(
    model: torch.nn.Module, experience, device, batch_size: int = 256, *, protocol: str = "masked"
) -> float:
    """Top-1 accuracy of ``model`` on ``experience`` (eval transforms, eval mode, no grad).

    ``protocol``: ``"masked"`` (argmax of ``model(x)``) or ``"lab"`` (argmax over all output
    units, see :func:`lab_correct`). The model's training mode is restored afterwards.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return _experience_accuracies(model, experience, device, batch_size)[protocol]


class LabAccuracy(PluginMetric[float]):
    """Accuracy under the lab protocol, per test experience, per stream and averaged.

    During every evaluation on the test stream each sample is counted as correct when the argmax
    over all output units is its class's unit (:func:`lab_correct`). Emitted after each
    evaluation:

    * :data:`LAB_ACC_EXP` -- per evaluated experience;
    * :data:`LAB_ACC_STREAM` -- over all samples evaluated (sample-weighted);
    * :data:`LAB_AVG_ACC` -- (outside the training of an experience) the mean of the
      per-experience accuracies over the experiences trained so far: the lab's final accuracy
      after the last experience.

    ``history[n]`` holds that mean after ``n`` trained experiences, ``per_experience[n]`` the
    per-experience accuracies of that evaluation.
    """

    def __init__(self, stream_name: str = "test"):
        super().__init__()
        self.stream_name = stream_name
        self.trained: set[int] = set()
        self.history: dict[int, float] = {}
        self.per_experience: dict[int, dict[int, float]] = {}
        self._in_experience = False
        self._correct: dict[int, int] = {}
        self._total: dict[int, int] = {}

    def reset(self) -> None:
        self._correct, self._total = {}, {}

    def result(self) -> float | None:
        """The latest mean over trained experiences (``None`` before any)."""
        return self.history[max(self.history)] if self.history else None

    def before_training_exp(self, strategy):
        self._in_experience = True

    def after_training_exp(self, strategy):
        self.trained.add(int(strategy.experience.current_experience))
        self._in_experience = False

    def before_eval(self, strategy):
        self.reset()

    def after_eval_iteration(self, strategy):
        if strategy.experience.origin_stream.name != self.stream_name:
            return
        j = int(strategy.experience.current_experience)
        ok = lab_correct(strategy.model, strategy.mb_x, strategy.mb_y, strategy.mb_output)
        self._correct[j] = self._correct.get(j, 0) + int(ok.sum())
        self._total[j] = self._total.get(j, 0) + int(ok.numel())

    def after_eval(self, strategy):
        if not self._total:
            return None
        x = strategy.clock.train_iterations
        accs = {j: self._correct[j] / self._total[j] for j in sorted(self._total) if self._total[j]}
        values = [MetricValue(self, LAB_ACC_EXP.format(j), a, x) for j, a in accs.items()]
        stream = sum(self._correct.values()) / max(sum(self._total.values()), 1)
        values.append(MetricValue(self, LAB_ACC_STREAM, stream, x))
        trained = [accs[j] for j in sorted(self.trained) if j in accs]
        if trained and not self._in_experience:
            n = len(self.trained)
            self.history[n] = sum(trained) / len(trained)
            self.per_experience[n] = accs
            values.append(MetricValue(self, LAB_AVG_ACC, self.history[n], x))
        return values

    def __str__(self) -> str:
        return "LabAccuracy"


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
    """Forward transfer measured at the start of each training experience, under both protocols.

    One pass over test experience k gives the masked and the lab accuracy (the dicts without
    ``lab_`` are the masked protocol's, the ``lab_`` ones the lab's); :meth:`result` and
    :meth:`lab_result` are the means over k >= 1.

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
        self.lab_random_init_accuracy: dict[int, float] = {}
        self.lab_accuracy_at_start: dict[int, float] = {}
        self.lab_transfer: dict[int, float] = {}

    def reset(self) -> None:
        pass

    @staticmethod
    def _mean_after_first(transfer: dict[int, float]) -> float | None:
        later = [v for k, v in transfer.items() if k >= 1]
        return sum(later) / len(later) if later else None

    def result(self) -> float | None:
        """Masked forward transfer: mean over k >= 1."""
        return self._mean_after_first(self.transfer)

    def lab_result(self) -> float | None:
        """Lab forward transfer: mean over k >= 1."""
        return self._mean_after_first(self.lab_transfer)

    def _accuracies(self, model, k: int, device) -> dict[str, float]:
        return _experience_accuracies(model, self.test_stream[k], device, self.eval_mb_size)

    def before_training(self, strategy):
        if self.random_init_accuracy:
            return None
        # A copy of the model before any training: the reference of forward transfer.
        reference = copy.deepcopy(strategy.model).to(strategy.device)
        for k in range(len(self.test_stream)):
            accs = self._accuracies(reference, k, strategy.device)
            self.random_init_accuracy[k] = accs["masked"]
            self.lab_random_init_accuracy[k] = accs["lab"]
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
        accs = self._accuracies(strategy.model, k, strategy.device)
        self.accuracy_at_start[k] = accs["masked"]
        self.transfer[k] = accs["masked"] - self.random_init_accuracy[k]
        self.lab_accuracy_at_start[k] = accs["lab"]
        self.lab_transfer[k] = accs["lab"] - self.lab_random_init_accuracy[k]
        x = strategy.clock.train_iterations
        values = [
            MetricValue(self, ACC_AT_START.format(k), accs["masked"], x),
            MetricValue(self, FWT_EXP.format(k), self.transfer[k], x),
            MetricValue(self, LAB_ACC_AT_START.format(k), accs["lab"], x),
            MetricValue(self, LAB_FWT_EXP.format(k), self.lab_transfer[k], x),
        ]
        if self.result() is not None:
            values.append(MetricValue(self, FWT_STREAM, self.result(), x))
            values.append(MetricValue(self, LAB_FWT_STREAM, self.lab_result(), x))
        return values

    def __str__(self) -> str:
        return "ForwardTransferAtStart"


def rank_masked_last(logits: Tensor) -> Tensor:
    """``logits`` with each masked-out class (at or below :data:`MASKED_LOGIT`) given the lowest
    logit of its row that is not masked: ranked last, tied, the way a plain classifier scores a
    class it has not been trained on. A row masked throughout becomes zeros (a uniform guess)."""
    masked = logits <= MASKED_LOGIT
    lowest = logits.masked_fill(masked, float("inf")).amin(dim=1, keepdim=True)
    lowest = torch.where(torch.isinf(lowest), torch.zeros_like(lowest), lowest)
    return torch.where(masked, lowest.expand_as(logits), logits)


def evaluation_loss(strategy) -> Tensor:
    """The evaluation loss logged for the current mini-batch: ``strategy.loss`` when the output
    masks no class (exactly Avalanche's value), else the strategy's criterion on
    :func:`rank_masked_last` of the output (cross-entropy when it keeps none)."""
    out = strategy.mb_output
    if not isinstance(out, Tensor) or out.dim() != 2 or not bool((out <= MASKED_LOGIT).any()):
        return strategy.loss
    criterion = getattr(strategy, "_criterion", None) or F.cross_entropy
    with torch.no_grad():
        return criterion(rank_masked_last(out.detach().float()), strategy.mb_y)


class MaskAwareExperienceLoss(ExperienceLoss):
    """Avalanche's ``Loss_Exp`` on :func:`evaluation_loss`."""

    def update(self, strategy):
        self._loss.update(evaluation_loss(strategy), patterns=len(strategy.mb_y))


class MaskAwareStreamLoss(StreamLoss):
    """Avalanche's ``Loss_Stream`` on :func:`evaluation_loss`."""

    def update(self, strategy):
        self._loss.update(evaluation_loss(strategy), patterns=len(strategy.mb_y))
