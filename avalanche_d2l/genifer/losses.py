"""Genifer's distillation terms on replayed images (teacher: the classifier of the previous
experience, frozen)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["feature_distance", "kd_loss"]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    old_classes: Sequence[int],
    temperature: float,
) -> torch.Tensor:
    """``-sum_{c in old} softmax(teacher/T)_c * log_softmax(student/T)_c`` (times T^2).

    The teacher's softmax runs over its old classes only (a grown IncrementalClassifier head, or
    a fixed head with unused units); the student's over all its (unmasked) outputs.
    """
    old = torch.as_tensor(list(old_classes), device=teacher_logits.device)
    p_t = torch.softmax(teacher_logits.index_select(1, old).float() / temperature, dim=1)
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
