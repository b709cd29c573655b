"""The dream-set cache: dream images on disk, keyed by everything that made them.

A dream set is a function of the learner (weights, head layout), the buffer it was anchored on,
the prompt inventory and oracle it started from, the dream settings, the dreamer and the input
space. :func:`cache_key` hashes all of them; :class:`DreamCache` writes a set atomically (temp
file + rename, main process only), reads it back only under the same key, sets an unreadable file
aside (``*.corrupt``) and keeps ``keep`` files per experience.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.storage import atomic_write, set_aside
from ..dreaming.accel import is_main_process
from .jobs import DreamSet

__all__ = ["DreamCache", "cache_key", "phase_key", "prompt_digest", "tensor_digest"]


def tensor_digest(h, t: Tensor) -> None:
    """Feed ``t``'s bytes into the hash ``h``."""
    h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def cache_key(*, model, buffer: dict[str, Tensor], payload: dict[str, Any]) -> str:
    """Hash of the learner's state, the buffer's contents and a JSON-able ``payload``."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        tensor_digest(h, t)
    for name in sorted(buffer):
        tensor_digest(h, buffer[name])
    h.update(json.dumps(payload, sort_keys=True, default=str).encode())
    return h.hexdigest()


def prompt_digest(t: Tensor) -> str:
    """Hex digest of a prompt's values (float32)."""
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def phase_key(
    *, model, buffer, config, experience, keys, jobs, dreamer, source, space, oracle, prompts
) -> str:
    """The key of a dreaming phase's dream set: the learner, the buffer, the dream settings, the
    phase's jobs, the dreamer (its config and where it came from), the input space, and the
    oracle and prompt inventory the phase started from."""
    payload = {
        "dream": config.fingerprint(),
        "experience": experience,
        "keys": keys,
        "heads": [j.head for j in jobs],
        "dreamer": getattr(getattr(dreamer, "config", None), "to_dict", dict)(),
        "source": source,
        "space": dataclasses.asdict(space),
        "oracle": oracle.digest(),
        "prompts": {key: prompt_digest(p) for key, p in prompts.items()},
    }
    return cache_key(model=model, buffer=buffer, payload=payload)


class DreamCache:
    """Dream sets of one run in ``folder`` (``None``: no cache)."""

    def __init__(self, folder: str | os.PathLike | None, keep: int = 1):
        self.folder = Path(folder) if folder is not None else None
        self.keep = max(int(keep), 1)

    def path(self, k: int, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"dreams_exp{k}_{key[:16]}.pt"

    def read(self, path: Path | None, key: str) -> dict | None:
        """The set at ``path`` if it holds ``key``; an unreadable file is moved aside."""
        if path is None or not path.is_file():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or "images_u8" not in blob:
                raise ValueError("not a D2L dream set")
        except Exception as err:  # noqa: BLE001 -- any unreadable file is set aside, then rebuilt
            aside = set_aside(path)
            warnings.warn(
                f"the dream cache {path} could not be loaded ({type(err).__name__}: {err}); "
                f"moved it to {aside} and dreaming again",
                stacklevel=3,
            )
            return None
        return blob if blob.get("key") == key else None

    def load_or_make(self, k: int, key: str, *, space, oracle, make):
        """``(dream set, from the cache, (path, key) of its file or None)``: the set cached under
        ``key`` (the oracle restored to its state after that phase), else ``make()``, written."""
        path = self.path(k, key)
        blob = self.read(path, key)
        if blob is not None:
            images = space.dequantise(blob["images_u8"])
            result = DreamSet(blob["heads"], blob["prompts"], images, blob["labels"])
            oracle.load_state_dict(blob["oracle"])
            return result, True, (str(path), key)
        result = make()
        written = self.write(
            k,
            key,
            {
                "heads": result.heads,
                "prompts": result.prompts,
                "labels": result.labels,
                "images_u8": space.quantise(result.images),
                "oracle": oracle.state_dict(),
            },
        )
        return result, False, (str(written), key) if written is not None else None

    def write(self, k: int, key: str, blob: dict[str, Any]) -> Path | None:
        """Write ``blob`` under ``key`` (main process only); returns its path."""
        path = self.path(k, key)
        if path is None or not is_main_process():
            return None
        atomic_write(path, lambda tmp: torch.save({**blob, "key": key}, tmp), what="the dream set")
        files = sorted(
            (Path(p) for p in glob.glob(str(self.folder / f"dreams_exp{k}_*.pt"))),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for p in [p for p in files if p != path][self.keep - 1 :]:
            p.unlink(missing_ok=True)
        return path
