"""What D2L needs from its rehearsal host (ER / ``Replay``, ER-ACE, DER++): the buffer, the
host's replay loss, DER's distillation targets aligned with the dream columns."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .heads import MASK_VALUE

__all__ = [
    "align_der_targets",
    "buffer_tensors",
    "der_targets",
    "host_kind",
    "replay_loss",
    "replay_source",
    "run_after_replay",
]


def host_kind(strategy, owner) -> str:
    """``"der"``, ``"er_ace"`` or ``"replay"``: which replay loss the host uses."""
    if owner is strategy and hasattr(strategy, "batch_size_mem"):
        if hasattr(strategy, "alpha") and hasattr(strategy, "beta"):
            return "der"
        if hasattr(strategy, "ace_criterion"):
            return "er_ace"
    return "replay"


def run_after_replay(plugin, strategy) -> None:
    """Put ``plugin`` right after the replay plugin whose buffer it uses, when it came before it
    (Avalanche's ``Replay`` appends its ``ReplayPlugin`` after the plugins it is given): its
    sleep phase must see the buffer that holds the experience just trained on. The strategy's
    plugin list is replaced, not changed in place, so a hook loop running over it is unaffected.
    """
    if plugin.buffer is not None or getattr(strategy, "storage_policy", None) is not None:
        return
    plugins = list(strategy.plugins)
    holders = [p for p in plugins if hasattr(getattr(p, "storage_policy", None), "buffer")]
    if plugin not in plugins or not holders or plugins.index(holders[0]) < plugins.index(plugin):
        return
    plugins.remove(plugin)
    plugins.insert(plugins.index(holders[0]) + 1, plugin)
    strategy.plugins = plugins


def replay_source(plugin, strategy):
    """``(owner, buffer)``: the rehearsal buffer and what holds it, or ``(None, None)``.

    ``plugin.buffer`` when given; else the strategy's ``storage_policy`` (ER-ACE, DER); else a
    plugin's (``ReplayPlugin``). Warns when that replay plugin comes after D2L's (its
    ``after_training_exp`` would add the current experience only after the sleep phase).
    """
    if plugin.buffer is not None:
        return plugin, getattr(plugin.buffer, "buffer", plugin.buffer)
    policy = getattr(strategy, "storage_policy", None)
    if policy is not None and hasattr(policy, "buffer"):
        return strategy, policy.buffer
    plugins = list(strategy.plugins)
    for i, p in enumerate(plugins):
        policy = getattr(p, "storage_policy", None)
        if policy is not None and hasattr(policy, "buffer"):
            if any(q is plugin for q in plugins[:i]):
                warnings.warn(
                    f"{type(p).__name__} comes after D2LPlugin in the strategy's plugins, so "
                    "the sleep phase runs before the buffer holds the current experience: "
                    "put the replay plugin first, e.g. plugins=[ReplayPlugin(...), "
                    "D2LPlugin(...)]",
                    stacklevel=3,
                )
            return p, policy.buffer
    return None, None


def buffer_tensors(buffer) -> dict[str, Tensor]:
    """All samples of a replay buffer as CPU tensors (``x``, ``y`` and DER's ``logits``)."""
    parts: dict[str, list[Tensor]] = {"x": [], "y": [], "logits": []}
    for batch in DataLoader(buffer, batch_size=256, shuffle=False):
        parts["x"].append(batch[0].cpu())
        parts["y"].append(batch[1].cpu())
        if len(batch) >= 4:
            parts["logits"].append(batch[3].cpu())
    if not parts["x"]:
        return {"x": torch.empty(0), "y": torch.empty(0, dtype=torch.long)}
    out = {"x": torch.cat(parts["x"]), "y": torch.cat(parts["y"]).long()}
    if parts["logits"]:
        out["logits"] = torch.cat(parts["logits"]).float()
    return out


def align_der_targets(strategy, model) -> None:
    """DER host: its stored logits stay in class space; align the distillation targets of the
    current minibatch with the training output (:func:`der_targets`). Other hosts: nothing."""
    stored = getattr(strategy, "batch_logits", None)
    if getattr(strategy, "replay_loader", None) is None or stored is None:
        return
    n = getattr(strategy, "batch_size_mem", -1)
    if hasattr(strategy, "alpha") and stored.shape == (n, model.n_classes):
        strategy.batch_logits = der_targets(stored, strategy.mb_output[:n], model.n_classes)


def der_targets(stored: Tensor, current: Tensor, n_classes: int) -> Tensor:
    """DER's distillation targets for a training output with dream columns.

    ``stored``: ``(B, n_classes)`` class-space logits kept in the buffer; ``current``: the
    learner's ``(B, n_classes + K)`` training output. Classes that had no head when the logits
    were stored (:data:`MASK_VALUE`) were ranked below every class the stored output scored: the
    target keeps that ranking, ``min(current, lowest stored logit of the sample)``. Dream columns
    take the current (detached) output: the stored logits say nothing of dreams.
    """
    cur = current.detach()
    target = stored.to(cur.dtype).clone()
    masked = target <= MASK_VALUE / 2
    lowest = target.masked_fill(masked, float("inf")).amin(1, keepdim=True)
    ranked_below = torch.minimum(cur[:, :n_classes], lowest.expand_as(target))
    target[masked] = ranked_below[masked]
    if cur.shape[1] > n_classes:
        target = torch.cat([target, cur[:, n_classes:]], dim=1)
    return target


def replay_loss(kind: str, strategy, out: Tensor, y: Tensor, stored: Tensor | None) -> Tensor:
    """The host's replay loss on buffer samples: ER -- its criterion; ER-ACE -- cross-entropy
    over the whole output; DER++ -- ``beta * CE + alpha * MSE`` to the stored logits."""
    if kind == "der":
        n_classes = stored.shape[1]
        mse = F.mse_loss(out, der_targets(stored, out, n_classes))
        return strategy.beta * F.cross_entropy(out, y) + strategy.alpha * mse
    if kind == "er_ace":
        return F.cross_entropy(out, y)
    return strategy._criterion(out, y)
