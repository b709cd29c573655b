"""D2L's state between experiences: the prompt inventory, and the dream set made from it.

The inventory holds one prompt per dream class, keyed by what it grows from (``"c3/0"``: the
first dream class of learned class 3; ``"h7"``: an unanchored dream on head 7), and the head that
hosted it last. Checkpoints hold the inventory and the oracle; dream images are a keyed cache
(:mod:`avalanche_d2l.d2l.cache`) rebuilt from them.

:func:`plan_jobs` turns the inventory and the learner's state after an experience into the
dreaming phase's :class:`~avalanche_d2l.d2l.dreaming.DreamJob` list: which learned classes dream,
on which free heads, from which buffer images and prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional as F

from ..utils import training_mode
from .config import DreamConfig
from .jobs import DreamJob, direction
from .prompts import initial_prompt

__all__ = ["Inventory", "plan_jobs", "prototypes"]

#: Buffer images of a class used as anchors (and for its prototype) at most.
MAX_ANCHORS = 64


@dataclass
class Inventory:
    """Prompts by key, the head each key's dream class hosted last, and how each prompt began."""

    prompts: dict[str, Tensor] = field(default_factory=dict)
    homes: dict[str, int] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {
            "prompts": {k: p.clone() for k, p in self.prompts.items()},
            "homes": dict(self.homes),
            "origin": dict(self.origin),
        }

    def load_state_dict(self, state: dict) -> None:
        self.prompts = {str(k): p.clone() for k, p in state["prompts"].items()}
        self.homes = {str(k): int(h) for k, h in state["homes"].items()}
        self.origin = {str(k): str(v) for k, v in state.get("origin", {}).items()}


@torch.no_grad()
def prototypes(model, x: Tensor, y: Tensor, classes: list[int]) -> tuple[dict[int, Tensor], Tensor]:
    """``({class: direction of its buffer images}, center)``: the learner's view of the buffer."""
    dev = next(model.parameters()).device
    feats = {}
    with training_mode(model, False):
        for c in classes:
            xs = x[y == c][:MAX_ANCHORS]
            if xs.shape[0]:
                feats[c] = model.forward_heads(xs.to(dev), return_features=True)[1].float().cpu()
    if not feats:
        return {}, None
    center = F.normalize(torch.cat(list(feats.values())), dim=1).mean(0)
    return {c: direction(f, center) for c, f in feats.items()}, center


def _heads_for(keys: list[str], free: list[int], homes: dict[str, int]) -> list[int]:
    """A free head per key: the one it hosted last when still free, else the lowest unused."""
    taken = {homes[k] for k in keys if homes.get(k) in free}
    spare = [h for h in free if h not in taken]
    out = []
    for k in keys:
        out.append(homes[k] if homes.get(k) in free else spare.pop(0))
    return out


def plan_jobs(
    *,
    inventory: Inventory,
    model,
    buffer: dict[str, Tensor],
    dreamer,
    config: DreamConfig,
    experience: int,
    class_names: list[str] | None = None,
) -> tuple[list[DreamJob], list[str]]:
    """The dream classes of the phase after ``experience`` and their inventory keys.

    Anchored / interpolation / noise: ``dreams_per_class`` per learned class with buffer images
    (the classes rotate by experience when free heads are fewer); unanchored: one per free head.
    New keys get their first prompt (:func:`~avalanche_d2l.d2l.prompts.initial_prompt`).
    """
    free = model.free_heads()
    n_max = (
        len(free) if config.max_dream_classes is None else min(len(free), config.max_dream_classes)
    )
    x, y = buffer["x"], buffer["y"]
    seen = [c for c in range(model.n_classes) if int(model.class_to_head[c]) >= 0]
    seen = [c for c in seen if bool((y == c).any())]
    if config.source == "unanchored":
        keys = [f"h{h}" for h in free[:n_max]]
        sources = [-1] * len(keys)
    else:
        if seen:
            r = experience % len(seen)
            seen = seen[r:] + seen[:r]
        pairs = [(c, i) for i in range(config.dreams_per_class) for c in seen][:n_max]
        keys = [f"c{c}/{i}" for c, i in pairs]
        sources = [c for c, _ in pairs]
    heads = _heads_for(keys, free, inventory.homes)
    protos, center = prototypes(model, x, y, seen)
    g = torch.Generator().manual_seed(int(config.seed) + 7919 * int(experience) + 3)
    jobs = []
    for key, head, c in zip(keys, heads, sources):
        anchors = x[y == c][:MAX_ANCHORS] if c >= 0 else x[:0]
        if config.uses_dreamer and key not in inventory.prompts:
            name = class_names[c] if class_names is not None and c >= 0 else None
            p, how = initial_prompt(
                dreamer,
                anchors=anchors if config.source == "anchored" else None,
                name=name,
                config=config,
                generator=g,
            )
            inventory.prompts[key], inventory.origin[key] = p, how
        prompt = inventory.prompts.get(key, torch.empty(0))
        jobs.append(DreamJob(head, c, prompt, anchors, protos.get(c), center))
    return jobs, keys
