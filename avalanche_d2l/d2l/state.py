"""The D2L plugin's state: the dreamer (loaded from its source when first needed, then fitted to
the learner's input space), the dream set (uint8 in memory, or referenced by its cache file and
key after unpickling) and what ``state_dict`` / ``load_state_dict`` and pickling keep of the
method (the prompt inventory, the oracle, the assignments; never diffusion weights).
:class:`DreamSetState` holds them as methods of :class:`~avalanche_d2l.d2l.plugin.D2LPlugin`
(mixed into it)."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from torch import Tensor

from .config import DreamConfig
from .space import InputSpace, load_dreamer, size_to_data

__all__ = ["DreamSetState"]


class DreamSetState:
    """The dreamer, the dream set and the state of :class:`~avalanche_d2l.d2l.plugin.D2LPlugin`."""

    @property
    def base_dreamer(self):
        if self._base_dreamer is None:
            self._base_dreamer = load_dreamer(
                self.dreamer_source,
                self.dreamer_overrides,
                device=self.dreamer_device or "cpu",
                progress=False,
            )
        return self._base_dreamer

    @property
    def dreamer(self):
        """The dreamer fitted to the learner's input space (``None`` when dreams need none)."""
        if not self.config.uses_dreamer:
            return None
        if self._dreamer is None:
            if self.space is None:
                return self.base_dreamer
            _, self._dreamer, _ = size_to_data(space=self.space, dreamer=self.base_dreamer)
        return self._dreamer

    @property
    def dream_images(self) -> Tensor | None:
        """The dream set in the learner's input space (CPU)."""
        if self._dreams_float is None and self._dream_u8() is not None:
            self._dreams_float = self.space.dequantise(self._dream_u8())
        return self._dreams_float

    def _dream_u8(self) -> Tensor | None:
        if (
            self._dreams_u8 is None
            and self._dream_file is not None
            and self.dream_labels is not None
        ):
            path, key = self._dream_file
            blob = self.cache.read(Path(path), key)
            if blob is None:
                raise RuntimeError(
                    f"the dream set of this checkpoint, {path}, is missing or "
                    "unreadable: delete the checkpoint to restart the run"
                )
            self._dreams_u8 = blob["images_u8"]
        return self._dreams_u8

    def _set_dreams(self, u8: Tensor | None, labels: Tensor | None, file=None) -> None:
        """The dream set (``file``: ``(path, key)`` of the cache file holding exactly it)."""
        self._dreams_u8, self._dreams_float, self.dream_labels = u8, None, labels
        self._dream_file = file

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_dreamer=None, _dreams_float=None, _jobs={})
        if self.dreamer_source is not None:
            state["_base_dreamer"] = None  # reloaded from its source
        if self._dream_file is not None and Path(self._dream_file[0]).is_file():
            state["_dreams_u8"] = None  # referenced by its cache file and key
        return state

    def state_dict(self) -> dict[str, Any]:
        u8 = self._dream_u8()
        return {
            "config": self.config.to_dict(),
            "space": None if self.space is None else dataclasses.asdict(self.space),
            "inventory": self.inventory.state_dict(),
            "oracle": self.oracle.state_dict(),
            "dream_images_u8": None if u8 is None else u8.clone(),
            "dream_labels": None if self.dream_labels is None else self.dream_labels.clone(),
            "history": list(self.history),
            "assignments": [dict(a) for a in self.assignments],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cfg = DreamConfig.from_dict(state["config"])
        if cfg.fingerprint() != self.config.fingerprint():
            warnings.warn(
                "loading D2LPlugin state saved with another DreamConfig; the saved "
                "config replaces the current one",
                stacklevel=2,
            )
        self.config = cfg
        if state.get("space") is not None:
            sp = {k: tuple(v) if isinstance(v, list) else v for k, v in state["space"].items()}
            self.space, self._dreamer, self._space_learned = InputSpace(**sp), None, True
        self.inventory.load_state_dict(state["inventory"])
        self.oracle.load_state_dict(state["oracle"])
        self._dream_file = None
        self._dreams_u8, self._dreams_float = state["dream_images_u8"], None
        self.dream_labels = state["dream_labels"]
        self.history = list(state["history"])
        self.assignments = [{int(c): int(h) for c, h in a.items()} for a in state["assignments"]]
