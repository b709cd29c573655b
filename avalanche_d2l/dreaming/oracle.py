"""D2L's oracle: the rule that decides when a dream's soft prompt stops being updated.

The paper states only that "an oracle network decides when to stop the prompt updates". Our
choice (documented here because the sources are silent on the details):

* the oracle is *pluggable*: anything with ``should_stop(images, classifier_probs, step) ->
  (stop, reason)`` (the :class:`Oracle` protocol) can be passed to the dreaming loop;
* the default :class:`ReferenceOracle` uses a frozen reference network that is **independent of
  the continual learner** -- the dreamer's :meth:`~avalanche_d2l.dreaming.Dreamer.reference_network`
  (for Stable Diffusion a torchvision ImageNet classifier, for the offline glyph dreamer the glyph
  classifier trained with it). The learner's own opinion says when a dream is *done* (it
  recognises the dream as its dream class); the independent network says when optimisation has
  *gone wrong*: the images stopped looking like anything (predictive entropy near uniform), or
  they all collapsed onto a single concept the reference already knows (the dream became a copy
  of an existing class -- the "future-class leakage" the paper lists as a limit);
* there is always a step cap, so a dreaming phase has a bounded cost;
* without a reference network (Stable Diffusion without torchvision's ResNet-50 weights in the
  local cache and no ``oracle_reference`` given) only the threshold and the cap apply; that state
  is recorded (:meth:`ReferenceOracle.describe`, ``DreamResult.oracle``), and
  ``require_reference=True`` turns it into an error.

The dreaming loop (:func:`avalanche_d2l.dreaming.prompts.dream_classes`) calls the oracle once per
dream class per optimisation step, on the images just generated from that class's prompt, *before*
the prompt is updated with them. ``reason`` values in :data:`HALT_REASONS` mean "these images are
worse than the previous ones": the loop then restores the prompt of the previous step. Any other
stop reason keeps the current prompt.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = [
    "Oracle",
    "ReferenceOracle",
    "RECOGNISED",
    "DEGENERATED",
    "COLLAPSED",
    "STEP_CAP",
    "HALT_REASONS",
]

#: The learner recognises the dream as its dream class (mean target probability >= threshold).
RECOGNISED = "recognised"
#: The reference network finds the images meaningless (normalised entropy above the bound).
DEGENERATED = "degenerated"
#: The reference network puts all images on one concept it knows, with high confidence.
COLLAPSED = "collapsed"
#: The step budget is spent.
STEP_CAP = "step_cap"
#: Stop reasons after which the dreaming loop restores the prompt of the previous step.
HALT_REASONS = frozenset({DEGENERATED, COLLAPSED})


@runtime_checkable
class Oracle(Protocol):
    """Stop rule of the prompt optimisation of one dream class.

    ``should_stop`` is called once per dream class and optimisation step.

    Args:
        images: ``(B, C, H, W)`` images just generated from the class's prompt (no graph), in the
            classifier's input space.
        classifier_probs: ``(B,)`` the continual learner's probability, for each image, of the
            head the dream is optimised towards (softmax over the seen + dream heads).
        step: optimisation step, 0 for the initial prompt.

    Returns:
        ``(stop, reason)``; ``reason`` is ``""`` when not stopping. Use the reasons of this module
        (:data:`RECOGNISED`, :data:`DEGENERATED`, :data:`COLLAPSED`, :data:`STEP_CAP`) so the loop
        knows whether to keep the current prompt or to restore the previous one.
    """

    def should_stop(
        self, images: Tensor, classifier_probs: Tensor, step: int
    ) -> tuple[bool, str]: ...


class ReferenceOracle:
    """Default oracle: learner-recognition threshold + independent reference checks + step cap.

    Checks, in order:

    1. ``step >= max_steps`` -> :data:`STEP_CAP`.
    2. ``step >= min_steps`` and the reference network (if any) says the batch **degenerated**:
       mean normalised predictive entropy ``H(p) / log(K) > max_entropy`` -> :data:`DEGENERATED`.
    3. ``step >= min_steps`` and the reference network says the batch **collapsed** onto one of
       its concepts: the mean probability of the batch's most likely concept ``> collapse_prob``
       -> :data:`COLLAPSED`.
    4. mean ``classifier_probs >= threshold`` -> :data:`RECOGNISED` (skipped when ``threshold``
       is ``None``: an objective that keeps dreams near the seen classes, ``seen_mass > 0``,
       never lets the learner's target probability approach 1, so only the other rules stop).

    The reference checks start at ``min_steps`` (default 1) because they judge what the
    *optimisation* did: the initial prompt is the dreamer's own, and if its images already trip a
    check there is no earlier prompt to fall back to. Without a reference network only the
    threshold and the step cap apply.

    Args:
        reference: frozen classifier taking images in the classifier's input space (e.g.
            ``dreamer.reference_network()``), or ``None``.
        threshold: mean target probability at which the learner "recognises" the dream
            (``None``: no recognition stop).
        max_steps: step cap (always applied).
        min_steps: first step at which the reference checks apply.
        max_entropy: bound on the normalised entropy in ``[0, 1]``; ``None`` disables the check.
        collapse_prob: bound on the batch's top-concept probability; ``None`` disables the check.
        reference_source: where the reference came from (recorded by :meth:`describe`).
        reference_missing: why there is no reference (recorded by :meth:`describe`).
    """

    def __init__(
        self,
        *,
        reference: nn.Module | None = None,
        threshold: float | None = 0.9,
        max_steps: int = 50,
        min_steps: int = 1,
        max_entropy: float | None = 0.95,
        collapse_prob: float | None = 0.98,
        reference_source: str | None = None,
        reference_missing: str | None = None,
    ):
        if max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps}")
        if max_entropy is not None and not 0.0 < max_entropy <= 1.0:
            raise ValueError(f"max_entropy is a normalised entropy in (0, 1], got {max_entropy}")
        if collapse_prob is not None and not 0.0 < collapse_prob <= 1.0:
            raise ValueError(f"collapse_prob must be in (0, 1], got {collapse_prob}")
        self.reference = reference
        if reference is not None:
            reference.requires_grad_(False)
            reference.eval()
        self.threshold = None if threshold is None else float(threshold)
        self.max_steps = int(max_steps)
        self.min_steps = int(min_steps)
        self.max_entropy = max_entropy
        self.collapse_prob = collapse_prob
        self.reference_source = reference_source
        self.reference_missing = reference_missing
        self.last_stats: dict[str, float] = {}

    @classmethod
    def from_dreamer(
        cls,
        dreamer,
        *,
        reference: str | nn.Module | None = None,
        require_reference: bool = False,
        **kwargs,
    ) -> ReferenceOracle:
        """Oracle using the dreamer's reference network (``None`` -> threshold + cap only).

        Args:
            dreamer: the dreamer; its :meth:`reference_network` is used unless ``reference``.
            reference: a reference to use instead: a path or hub id (loaded with the dreamer's
                :meth:`set_reference`, which keeps it for later phases) or a module.
            require_reference: raise when no reference network is available.
            **kwargs: the other :class:`ReferenceOracle` arguments.
        """
        source, missing = None, None
        info = dreamer.reference_info() if hasattr(dreamer, "reference_info") else {}
        if reference is not None and not isinstance(reference, nn.Module):
            source = str(reference)
            # loaded once: later phases find it on the dreamer
            same = info.get("present") and info.get("source") == source
            ref = dreamer.reference_network() if same else dreamer.set_reference(reference)
        elif reference is not None:
            ref, source = reference, type(reference).__name__
        else:
            ref = dreamer.reference_network()
            info = dreamer.reference_info() if hasattr(dreamer, "reference_info") else {}
            source = info.get("source") if ref is not None else None
            missing = info.get("missing_reason") if ref is None else None
            if ref is None and missing is None:
                missing = f"{type(dreamer).__name__} has no reference network"
        if ref is None and require_reference:
            raise RuntimeError(
                f"the oracle needs a reference network and there is none ({missing}); give "
                "DreamConfig.oracle_reference (a torchvision ResNet-50 .pth file or a "
                "transformers image-classification hub id / directory), or set "
                "require_reference=False to stop on the learner's threshold and the step cap only"
            )
        return cls(reference=ref, reference_source=source, reference_missing=missing, **kwargs)

    def describe(self) -> dict:
        """JSON-able state: whether a reference network judges the dreams, and the settings."""
        return {
            "type": type(self).__name__,
            "reference_present": self.reference is not None,
            "reference_source": self.reference_source if self.reference is not None else None,
            "reference_missing": self.reference_missing if self.reference is None else None,
            "threshold": self.threshold,
            "max_steps": self.max_steps,
            "min_steps": self.min_steps,
            "max_entropy": self.max_entropy,
            "collapse_prob": self.collapse_prob,
        }

    @torch.no_grad()
    def reference_stats(self, images: Tensor) -> tuple[float, float]:
        """``(normalised entropy, top-concept probability)`` of the reference on ``images``."""
        assert self.reference is not None
        logits = self.reference(images).float()
        probs = logits.softmax(dim=1)
        k = probs.shape[1]
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1) / math.log(max(k, 2))
        top = probs.mean(0).argmax()
        return float(entropy.mean()), float(probs[:, top].mean())

    def should_stop(self, images: Tensor, classifier_probs: Tensor, step: int) -> tuple[bool, str]:
        self.last_stats = {"target_prob": float(classifier_probs.float().mean())}
        if step >= self.max_steps:
            return True, STEP_CAP
        if self.reference is not None and step >= self.min_steps:
            entropy, top = self.reference_stats(images)
            self.last_stats.update(ref_entropy=entropy, ref_top_prob=top)
            if self.max_entropy is not None and entropy > self.max_entropy:
                return True, DEGENERATED
            if self.collapse_prob is not None and top > self.collapse_prob:
                return True, COLLAPSED
        if self.threshold is not None and self.last_stats["target_prob"] >= self.threshold:
            return True, RECOGNISED
        return False, ""

    def __repr__(self) -> str:
        ref = type(self.reference).__name__ if self.reference is not None else None
        return (
            f"ReferenceOracle(reference={ref}, threshold={self.threshold}, "
            f"max_steps={self.max_steps}, min_steps={self.min_steps}, "
            f"max_entropy={self.max_entropy}, collapse_prob={self.collapse_prob})"
        )
