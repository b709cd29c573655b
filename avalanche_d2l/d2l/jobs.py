"""What the dreaming loop works on and returns: a dream class to grow (:class:`DreamJob`), where a
batch sits in the learner's feature space (:func:`direction`) and a phase's output
(:class:`DreamSet`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from torch.nn import functional as F

__all__ = ["DreamJob", "DreamSet", "direction"]


@dataclass
class DreamJob:
    """One dream class to grow.

    Attributes:
        head: the free head hosting it.
        source: the learned class it grows from (``-1``: none).
        prompt: ``(L, D)`` starting prompt.
        anchors: ``(n, C, H, W)`` buffer images of ``source`` in the learner's space (empty:
            generation from pure noise).
        prototype: ``(F,)`` :func:`direction` of those images (or ``None``).
        center: ``(F,)`` mean normalised feature of the whole buffer (the origin of directions).
    """

    head: int
    source: int
    prompt: Tensor
    anchors: Tensor
    prototype: Tensor | None = None
    center: Tensor | None = None


def direction(feats: Tensor, center: Tensor | None) -> Tensor:
    """Where a batch sits in the learner's feature space: the mean of its L2-normalised features
    minus ``center`` (the buffer's), normalised. Centring matters: after a ReLU all features are
    non-negative and raw cosines are all near 1."""
    m = F.normalize(feats.float(), dim=1).mean(0)
    return F.normalize(m - center.to(m) if center is not None else m, dim=0)


@dataclass
class DreamSet:
    """A dreaming phase's output: final prompts, images (learner space, CPU) labelled with their
    heads, and the history (per-step means, stops, oracle)."""

    heads: Tensor
    prompts: Tensor
    images: Tensor
    labels: Tensor
    history: dict[str, Any] = field(default_factory=dict)
