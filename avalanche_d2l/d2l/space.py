"""Sizing D2L to the data, done once: the learner's input space and the dreamer fitted to it.

:func:`size_to_data` is the one place that reads an experience's images (shape, dtype, value
range, normalisation), fits the dreamer's output to them (size, 1 <-> 3 channels, normalisation)
and sizes the learner's extra head. Dreamers are loaded once per process (:func:`load_dreamer`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

__all__ = [
    "InputSpace",
    "fit_dreamer",
    "infer_input_space",
    "load_dreamer",
    "size_to_data",
    "stream_n_classes",
    "wrap_for",
]

#: ``D2LConfig.dreamer`` strings naming the offline glyph dreamer (grey, or coloured glyphs).
OFFLINE_DREAMERS = {"offline": 1, "offline-rgb": 3}
#: ``dreamer_overrides`` keys that choose which offline dreamer is loaded.
OFFLINE_LOADER_KEYS = ("image_size", "steps", "seed")


@dataclass(frozen=True)
class InputSpace:
    """Shape, dtype and value range of the learner's inputs (learned from real data).

    ``mean``/``std``: the per-channel normalisation ``(x01 - mean) / std`` of the learner's
    transforms (``None``: inputs are [0, 1] images).
    """

    shape: tuple[int, int, int]
    dtype: str = "float32"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def _ms(self) -> tuple[Tensor, Tensor]:
        return (torch.tensor(self.mean).view(1, -1, 1, 1), torch.tensor(self.std).view(1, -1, 1, 1))

    def to_unit(self, x: Tensor) -> Tensor:
        """Learner inputs -> [0, 1] images."""
        if self.mean is None:
            return x.float()
        m, s = self._ms()
        return x.float() * s.to(x.device) + m.to(x.device)

    def from_unit(self, x01: Tensor) -> Tensor:
        """[0, 1] images -> learner inputs (normalised, in the learner's dtype)."""
        x = x01.float()
        if self.mean is not None:
            m, s = self._ms()
            x = (x - m.to(x.device)) / s.to(x.device)
        return x.to(getattr(torch, self.dtype))

    def quantise(self, x: Tensor) -> Tensor:
        """Learner inputs -> uint8 images (how dream sets are stored)."""
        return (self.to_unit(x).clamp(0, 1) * 255).round().to(torch.uint8)

    def dequantise(self, u8: Tensor) -> Tensor:
        return self.from_unit(u8.float() / 255)


def _find_normalize(obj, depth: int = 0):
    """First ``Normalize``-like transform (``mean`` and ``std`` attributes) inside ``obj``."""
    if obj is None or depth > 6:
        return None
    if type(obj).__name__ == "Normalize" and hasattr(obj, "mean") and hasattr(obj, "std"):
        return obj
    if isinstance(obj, Mapping):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    else:
        names = ("transforms", "transform", "transform_groups", "_transform_groups")
        names += ("_frozen_transform_groups", "_flat_data", "_datasets")
        children = [getattr(obj, a, None) for a in names]
    for child in children:
        found = None if child is obj else _find_normalize(child, depth + 1)
        if found is not None:
            return found
    return None


def infer_input_space(dataset, *, max_samples: int = 256) -> InputSpace:
    """The :class:`InputSpace` of an experience's dataset (eval transforms).

    The normalisation is read from a ``Normalize`` transform when there is one; images already in
    [0, 1] need none; other ranges are mapped linearly from the observed per-channel range.
    """
    ds = dataset.eval() if hasattr(dataset, "eval") else dataset
    x = next(iter(DataLoader(ds, batch_size=min(max_samples, 256), shuffle=False)))[0]
    if x.dim() != 4:
        raise ValueError(
            f"D2L needs image inputs (C, H, W); the experience's samples have shape "
            f"{tuple(x.shape[1:])}"
        )
    shape = tuple(int(s) for s in x.shape[1:])
    if shape[1] != shape[2]:
        raise ValueError(
            f"D2L's dreamers make square images but the experience's images are {shape[1]}x"
            f"{shape[2]}: resize them to a square (e.g. torchvision Resize((S, S)))"
        )
    dtype = str(x.dtype).replace("torch.", "")
    norm = _find_normalize(ds)
    if norm is not None:
        mean = tuple(float(v) for v in torch.as_tensor(norm.mean).flatten().tolist())
        std = tuple(float(v) for v in torch.as_tensor(norm.std).flatten().tolist())
        if len(mean) == 1 and shape[0] > 1:
            mean, std = mean * shape[0], std * shape[0]
        return InputSpace(shape, dtype, mean, std)
    flat = x.float().transpose(0, 1).flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    if float(lo.min()) >= -1e-4 and float(hi.max()) <= 1 + 1e-4:
        return InputSpace(shape, dtype)
    span = (hi - lo).clamp_min(1e-6)
    return InputSpace(shape, dtype, tuple((-lo / span).tolist()), tuple((1.0 / span).tolist()))


def wrap_for(model, experience, *, shape=None, n_classes=None, **wrap_args):
    """``model`` wrapped in :class:`~avalanche_d2l.d2l.heads.DreamHeads` for ``experience``'s
    stream: ``n_classes`` (default: the stream's) and the input ``shape`` (default: the
    experience's first image's)."""
    from .heads import wrap_model

    n_classes = n_classes or stream_n_classes(experience)
    if n_classes is None:
        raise ValueError(
            "D2LPlugin cannot tell how many classes the stream has (its experiences "
            "name no benchmark with n_classes): pass D2LPlugin(n_classes=...)"
        )
    shape = shape or tuple(experience.dataset.eval()[0][0].shape)
    return wrap_model(model, n_classes=n_classes, image_shape=shape, **wrap_args)


def stream_n_classes(experience) -> int | None:
    """Classes of the benchmark ``experience`` belongs to: its ``n_classes`` (Avalanche's classic
    benchmarks), else one more than the largest class seen so far or still to come (Avalanche
    0.6 generators keep the dataset's labels); ``None`` when the experience says neither."""
    stream = getattr(experience, "origin_stream", None)
    bench = getattr(experience, "benchmark", None) or getattr(stream, "benchmark", None)
    if getattr(bench, "n_classes", None):
        return int(bench.n_classes)
    seen = getattr(experience, "classes_seen_so_far", None)
    future = getattr(experience, "future_classes", None)
    if seen is None or future is None:
        return None
    classes = [int(c) for c in (*seen, *future)]
    return 1 + max(classes) if classes else None


_DREAMERS: dict[tuple, Any] = {}


def load_dreamer(
    source: str, overrides: Mapping[str, Any] | None = None, *, device=None, progress: bool = True
):
    """The dreamer named by ``source`` with ``overrides``, loaded once per process.

    ``"offline"`` / ``"offline-rgb"``: the offline glyph dreamer (pretrained into the cache on
    first use); any other string: ``Dreamer.from_pretrained`` (our folder, a diffusers folder or
    hub id). The returned object is shared: it is never mutated (:func:`fit_dreamer` makes views).
    """
    overrides = dict(overrides or {})
    dev = str(torch.device(device)) if device is not None else "cpu"
    key = (source, json.dumps(overrides, sort_keys=True, default=str), dev)
    if key not in _DREAMERS:
        if source in OFFLINE_DREAMERS:
            from ..dreaming.pretrain import load_or_pretrain_offline_dreamer

            loader_kw = {k: overrides.pop(k) for k in OFFLINE_LOADER_KEYS if k in overrides}
            dreamer = load_or_pretrain_offline_dreamer(
                channels=OFFLINE_DREAMERS[source], device=dev, progress=progress, **loader_kw
            )
            dreamer = with_config(dreamer, overrides) if overrides else dreamer
        else:
            from ..dreaming.dreamer import Dreamer

            dreamer = Dreamer.from_pretrained(source, device=dev, **overrides)
        _DREAMERS[key] = dreamer
    return _DREAMERS[key]


def with_config(dreamer, changes: Mapping[str, Any]):
    """A view of ``dreamer`` (weights shared) whose config has ``changes``; its reference network
    follows the new output normalisation."""
    from ..dreaming.dreamer import DreamerConfig

    cfg = DreamerConfig.from_dict({**dreamer.config.to_dict(), **dict(changes)})
    view = copy.copy(dreamer)
    view.__dict__["_modules"] = dict(dreamer._modules)
    view.__dict__["config"] = cfg
    ref = dreamer._modules.get("_reference")
    if ref is not None and hasattr(ref, "src_mean"):
        ref = copy.copy(ref)
        ref.__dict__["src_mean"] = cfg.output_mean
        ref.__dict__["src_std"] = cfg.output_std
        view._modules["_reference"] = ref
    return view


def fit_dreamer(dreamer, space: InputSpace):
    """``dreamer`` generating images in ``space`` (size, channels, normalisation): a view with
    ``output_*`` set, or ``dreamer`` itself when it already matches. Dreamers without a
    ``config`` (custom stand-ins) must already match."""
    c, h, _ = space.shape
    cfg = getattr(dreamer, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict") or not hasattr(cfg, "output_size"):
        if tuple(dreamer.output_shape) != space.shape:
            raise ValueError(
                f"the dreamer makes {tuple(dreamer.output_shape)} images but the learner's are "
                f"{space.shape}; pass a dreamer with a matching output_shape"
            )
        return dreamer
    if cfg.channels != c and (cfg.channels not in (1, 3) or c not in (1, 3)):
        raise ValueError(
            f"the dreamer makes {cfg.channels}-channel images and the learner takes {c} channels: "
            "only 1 <-> 3 channels can be converted; pass a dreamer with matching channels"
        )
    want = {
        "output_size": h,
        "output_channels": c,
        "output_mean": list(space.mean) if space.mean is not None else None,
        "output_std": list(space.std) if space.std is not None else None,
    }
    have = {k: getattr(cfg, k) for k in want}
    have = {k: list(v) if isinstance(v, tuple) else v for k, v in have.items()}
    have["output_size"] = have["output_size"] or cfg.image_size
    have["output_channels"] = have["output_channels"] or cfg.channels
    return dreamer if have == want else with_config(dreamer, want)


def size_to_data(*, dataset=None, space: InputSpace | None = None, dreamer=None, model=None):
    """Size D2L to the data, once: ``(space, fitted dreamer, model gained parameters)``.

    Args:
        dataset: an experience's dataset to learn the space from (or ``space`` given).
        space: the input space, when already known (e.g. restored from a checkpoint).
        dreamer: the dreamer to fit (``None``: none, for dreams without a dreamer).
        model: the learner's :class:`~avalanche_d2l.d2l.heads.DreamHeads`, whose extra head is
            built for the space's shape (the optimizer must learn of new parameters).
    """
    if space is None:
        space = infer_input_space(dataset)
    fitted = fit_dreamer(dreamer, space) if dreamer is not None else None
    grew = bool(model.build(space.shape)) if model is not None else False
    return space, fitted, grew
