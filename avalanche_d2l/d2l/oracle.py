"""D2L's learned oracle: a small network that says when a dream's prompt should stop moving.

The paper's oracle is a trained network on the learner's features ``Z_t`` of the dream batch at
prompt step ``t``; how its labels are made is not published. Ours:

* **Input** ``Z_t``: the learner's pooled, L2-normalised features of the dream batch at step
  ``t``: their mean, and the change of that mean since step ``t - 1`` (where the optimisation is
  heading).
* **Labels, computed while optimising** (:func:`stop_label`): each step measures a dream class's
  *distinctness* ``D_t`` (the learner's mean probability of the dream's own head, over seen +
  dream heads) and *coherence* ``C_t`` (cosine between the dream's mean feature and its source
  class's prototype). Once step ``t + 1`` is measured, step ``t`` is labelled "stop" when
  distinctness did not rise by more than ``rule_rise`` or coherence fell by more than
  ``rule_drop``: past that step the prompt buys no new class, or leaves the learned manifold.
* **Training**: every labelled step joins the oracle's memory (``oracle_memory`` newest kept,
  across dreaming phases and experiences); after each prompt step the oracle takes
  ``oracle_updates`` Adam steps on a class-balanced logistic loss over the memory.
* **Decision**: from ``min_steps`` on, once the memory holds ``oracle_min_labels`` labels of
  both kinds, a class stops when the oracle's stop probability exceeds 0.5. The rule needs the
  step after to judge a step (and then goes back one prompt); the oracle decides on the step
  itself, from what it learned on earlier trajectories.

Controls (``DreamConfig.stop``): ``"rule"`` applies :func:`stop_label` directly, ``"fixed"`` only
the step cap. The cap always applies.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["LearnedOracle", "oracle_input", "stop_label"]


def oracle_input(mean_feature: Tensor, previous: Tensor | None) -> Tensor:
    """``Z_t``: the dream batch's normalised mean feature and its change since the last step."""
    delta = torch.zeros_like(mean_feature) if previous is None else mean_feature - previous
    return torch.cat([mean_feature, delta]).float().cpu()


def stop_label(
    d_now: float, d_next: float, c_now: float, c_next: float, *, rise: float, drop: float
) -> bool:
    """The rule: step ``t`` is a stop when distinctness stops rising or coherence falls."""
    return (d_next - d_now) <= rise or (c_now - c_next) > drop


class LearnedOracle:
    """The stop network and its labelled memory (the method's state; pickled with the plugin).

    Args:
        hidden: hidden width.
        lr: Adam learning rate.
        updates: gradient steps per :meth:`update`.
        min_labels: labels (both answers present) before :meth:`decide` answers.
        memory: labelled steps kept.
        seed: seeds the initialisation.
    """

    def __init__(
        self,
        *,
        hidden: int = 32,
        lr: float = 0.01,
        updates: int = 5,
        min_labels: int = 6,
        memory: int = 512,
        seed: int = 0,
    ):
        self.hidden, self.lr, self.updates = int(hidden), float(lr), int(updates)
        self.min_labels, self.memory, self.seed = int(min_labels), int(memory), int(seed)
        self.net: nn.Sequential | None = None  # built on the first input (feature width)
        self.inputs: list[Tensor] = []
        self.labels: list[float] = []
        self.n_updates = 0
        self.decisions = {"stop": 0, "go": 0}

    def _build(self, width: int) -> None:
        g = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            self.net = nn.Sequential(
                nn.Linear(width, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1)
            )
        finally:
            torch.random.set_rng_state(g)
        self._opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)

    def add(self, z: Tensor, stop: bool) -> None:
        """One labelled step (its input ``Z_t`` and the rule's answer)."""
        if self.net is not None and z.numel() != self.net[0].in_features:
            self.inputs, self.labels, self.net = [], [], None  # another learner: start again
        self.inputs.append(z.detach().float().cpu())
        self.labels.append(float(stop))
        del self.inputs[: -self.memory], self.labels[: -self.memory]

    @property
    def ready(self) -> bool:
        """Enough labels of both kinds to decide."""
        n_stop = sum(self.labels)
        return len(self.labels) >= self.min_labels and 0 < n_stop < len(self.labels)

    def update(self) -> None:
        """``updates`` Adam steps on the class-balanced logistic loss over the memory."""
        if not self.ready:
            return
        if self.net is None:
            self._build(self.inputs[0].numel())
        x, y = torch.stack(self.inputs), torch.tensor(self.labels)
        pos = float(y.mean())
        weight = torch.where(y > 0.5, 0.5 / pos, 0.5 / (1 - pos))
        with torch.enable_grad():
            for _ in range(self.updates):
                loss = F.binary_cross_entropy_with_logits(self.net(x).squeeze(1), y, weight=weight)
                self._opt.zero_grad(set_to_none=True)
                loss.backward()
                self._opt.step()
        self.n_updates += self.updates

    @torch.no_grad()
    def stop_probability(self, z: Tensor) -> float | None:
        """The network's probability that step ``z`` is a stop (``None`` before it is trained)."""
        if self.net is None or not self.ready or z.numel() != self.net[0].in_features:
            return None
        return float(torch.sigmoid(self.net(z.float().view(1, -1))).item())

    def decide(self, z: Tensor) -> bool:
        """Stop now? (``False`` until the oracle is trained.)"""
        p = self.stop_probability(z)
        stop = p is not None and p > 0.5
        if p is not None:
            self.decisions["stop" if stop else "go"] += 1
        return stop

    def describe(self) -> dict:
        n = len(self.labels)
        return {
            "type": "learned",
            "labels": n,
            "stop_share": sum(self.labels) / n if n else None,
            "updates": self.n_updates,
            "decisions": dict(self.decisions),
        }

    def state_dict(self) -> dict:
        """Tensors and plain values only (stored in dream-cache files and plugin states)."""
        return {
            "inputs": torch.stack(self.inputs) if self.inputs else torch.empty(0),
            "labels": torch.tensor(self.labels),
            "net": None if self.net is None else dict(self.net.state_dict()),
            "n_updates": self.n_updates,
            "decisions": dict(self.decisions),
        }

    def load_state_dict(self, state: dict) -> None:
        self.inputs = list(state["inputs"]) if state["inputs"].numel() else []
        self.labels = [float(v) for v in state["labels"].tolist()]
        self.net = None
        if state["net"] is not None:
            self._build(self.inputs[0].numel())
            self.net.load_state_dict(state["net"])
        self.n_updates = int(state["n_updates"])
        self.decisions = {k: int(v) for k, v in state["decisions"].items()}

    def digest(self) -> str:
        """Hash of the oracle's state (part of the dream cache's key)."""
        import hashlib

        h = hashlib.sha1()
        st = self.state_dict()
        for t in [st["inputs"], st["labels"], *(st["net"] or {}).values()]:
            h.update(t.detach().float().contiguous().numpy().tobytes())
        return h.hexdigest()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_opt", None)  # rebuilt on load (a fresh Adam state)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.net is not None:
            self._opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
