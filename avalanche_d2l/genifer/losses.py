"""Genifer's distillation terms on replayed images (teacher: the classifier of the previous
experience, frozen)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from avalanche_d2l.models.heads import pool_features

__all__ = ["DomainConfusion", "feature_distance", "kd_loss"]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    old_classes: Sequence[int],
    temperature: float,
    student_softmax: str = "all",
) -> torch.Tensor:
    """``-sum_{c in old} softmax(teacher/T)_c * log_softmax(student/T)_c`` (times T^2).

    The teacher's softmax runs over its old classes only (a grown IncrementalClassifier head, or
    a fixed head with unused units). The student's runs over all its (unmasked) outputs
    (``student_softmax="all"``), so the term also pushes probability from the other classes
    to the old ones; with ``"old"`` over the old classes only (LwF's form, as in Avalanche's
    ``LwF``), so it holds the old classes' answers relative to each other and leaves the
    competition with new classes to the cross-entropy.
    """
    old = torch.as_tensor(list(old_classes), device=teacher_logits.device)
    p_t = torch.softmax(teacher_logits.index_select(1, old).float() / temperature, dim=1)
    if student_softmax == "old":
        log_s = torch.log_softmax(student_logits.index_select(1, old).float() / temperature, 1)
    else:
        log_s = torch.log_softmax(student_logits.float() / temperature, dim=1).index_select(1, old)
    return -(p_t * log_s).sum(dim=1).mean() * temperature * temperature


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, distance: str) -> torch.Tensor:
    """Mean over samples of the L2 distance of their flattened features.

    ``distance="rms"``: divided by the square root of the number of feature values (a
    per-element root mean square), so the term's strength does not grow with the feature layer's
    size: a conv map and its global average pool give the same value for a change that is uniform
    over space. ``"norm"``: the reference's unnormalised norm (at its own layer, 256x8x8, it
    equals 128 x the "rms" value).
    """
    diff = (student.float() - teacher.float()).flatten(1)
    dist = diff.norm(dim=1)
    if distance == "rms":
        dist = dist / math.sqrt(diff.shape[1])
    return dist.mean()


class _Reverse(torch.autograd.Function):
    """Identity forward; the gradient negated on the way back."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class DomainConfusion:
    """A linear probe that tells replayed rows from real ones on pooled features, trained by its
    own Adam; its loss returns through a gradient reversal, so minimising it (probe) also
    pushes the features towards rows it cannot tell apart (the classifier). Starts at zero."""

    def __init__(self, channels: int, lr: float, device):
        self.probe = nn.Linear(channels, 1).to(device)
        nn.init.zeros_(self.probe.weight)
        nn.init.zeros_(self.probe.bias)
        self.optimizer = torch.optim.Adam(self.probe.parameters(), lr=lr)

    def loss(self, features: torch.Tensor, n_real: int) -> torch.Tensor:
        """Binary cross-entropy of replay (rows from ``n_real`` on) against real."""
        logits = self.probe(_Reverse.apply(pool_features(features.float()))).squeeze(1)
        target = torch.zeros_like(logits)
        target[n_real:] = 1.0
        return F.binary_cross_entropy_with_logits(logits, target)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
