"""Pretrain (or load from cache) the offline glyph dreamer.

With no downloadable weights, the CPU default needs its own frozen text-to-image-like model: a small
pixel-space ``UNet2DConditionModel`` trained with the DDPM objective on font glyphs
(:mod:`avalanche_d2l.dreaming.glyphs`; no digits). Its conditioning comes from a learned concept
table ``(K, L, D)`` -- the stand-in for a text encoder's output space -- with a learned null prompt
for classifier-free guidance (label dropout). Small Gaussian noise on the conditioning during
training keeps the neighbourhood of every concept (and mixes of concepts) meaningful, which is
where D2L's soft prompts live.

A small reference glyph classifier is trained on the same data and saved alongside: D2L's oracle
uses it as a judge independent of the continual learner. ``training_info.json`` records what the
model saw (fonts, glyphs, augmentation), the settings, the loss curve, and the reference
classifier's accuracy on class-conditional dreamer samples (the "are samples recognisable" check).

Where a dreamer comes from (:func:`load_or_pretrain_offline_dreamer`):

1. **shipped** -- the package carries the pretrained 16 px grey glyph dreamer
   (``avalanche_d2l/data/dreamers/``, with the command that made it, its settings and the sha256 of
   every file); a request whose settings match it gets it, so every machine dreams with the same
   weights;
2. **cache** -- other settings are pretrained once into ``$AVALANCHE_D2L_CACHE`` (default
   ``~/.cache/avalanche_d2l``), in a folder named by a readable prefix plus a hash of every setting
   that changes the weights (:func:`dreamer_key`).

The learner's image shape never needs its own pretraining: the dreamer generates at its native
size and channels and maps its output to the learner's (``DreamerConfig.output_size`` /
``output_channels``: bilinear resize, grey repeated to RGB or RGB to luminance).

Every folder is written into a temporary sibling and renamed into place, with ``manifest.json``
(file hashes) written last; a folder that fails its hashes or does not load is reported with its
path, moved aside and rebuilt.

Command line (wired as ``avalanche-d2l pretrain-dreamer``)::

    avalanche-d2l pretrain-dreamer [--out DIR] [--steps N] [--image-size 16] [--channels 1]
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.storage import atomic_write, set_aside
from ..utils import resolve_device
from .config import CONFIG_NAME
from .dreamer import Dreamer
from .folders import (
    MANIFEST_NAME,
    NATIVE_SIZE,
    WEIGHT_FILES,
    DreamerFolderError,
    _make_temp_sibling,
    _replace_dir,
    _sha256_file,
    _sha256_json,
    _versions,
    default_cache_dir,
    shipped_dreamers,
    verify_dreamer_dir,
    weights_digest,
)
from .glyphs import GlyphConfig
from .pretrain_settings import (
    _fingerprint,
    dreamer_key,
    pretrain_command,
    resolve_pretrain_config,
)
from .training import PretrainConfig, _train, evaluate_dreamer

__all__ = [
    "MANIFEST_NAME",
    "DreamerFolderError",
    "NATIVE_SIZE",
    "PretrainConfig",
    "default_cache_dir",
    "dreamer_key",
    "evaluate_dreamer",
    "load_or_pretrain_offline_dreamer",
    "main",
    "offline_dreamer_available",
    "pretrain_command",
    "pretrain_offline_dreamer",
    "resolve_pretrain_config",
    "shipped_dreamers",
    "verify_dreamer_dir",
    "weights_digest",
]

logger = logging.getLogger(__name__)


def pretrain_offline_dreamer(
    out_dir: str | os.PathLike,
    *,
    image_size: int = 16,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    config: PretrainConfig | None = None,
    glyph_config: GlyphConfig | None = None,
    channels: int = 1,
    lr: float | None = None,
) -> Dreamer:
    """Pretrain the glyph dreamer and its reference classifier on CPU; save to ``out_dir``.

    The folder is written whole or not at all: training and saving happen in a temporary sibling
    that replaces ``out_dir`` at the end (an interruption leaves ``out_dir`` as it was; an
    existing dreamer folder is replaced as a whole, so no stale file survives).

    Args:
        out_dir: directory to write (``Dreamer.save_pretrained`` layout + ``samples.png``,
            ``TRAINED_ON.md`` and ``manifest.json``); it must be new, empty or a dreamer folder.
        image_size: native image side of the dreamer.
        steps: denoiser training steps (default ``PretrainConfig.steps``).
        batch_size: images per step (default ``PretrainConfig.batch_size``).
        seed: seed of everything.
        progress: tqdm bars.
        config: full settings (``image_size``/``seed`` and the given ``steps``/``batch_size``/
            ``lr`` override it).
        glyph_config: the glyph world's settings (default :class:`GlyphConfig`).
        channels: 1 (grey glyphs) or 3 (each glyph in its own colours on its own background).
        lr: peak learning rate (default ``PretrainConfig.lr``).

    Returns:
        The frozen :class:`Dreamer` (on the CPU), with ``training_info`` attached.

    Raises:
        ValueError: an invalid setting, or ``out_dir`` is a file or a non-empty folder that is
            not a dreamer folder.
        OSError: ``out_dir``'s parent cannot be created or written.
    """
    pc, gc = resolve_pretrain_config(
        image_size=image_size,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        lr=lr,
        config=config,
        glyph_config=glyph_config,
        channels=channels,
    )
    out_dir = Path(out_dir)
    tmp = _make_temp_sibling(out_dir)  # fails here, before any work, when out_dir is unusable
    try:
        dreamer = _train(tmp, pc, gc, progress)
        _write_manifest(tmp, pc, gc, weights_digest(dreamer))
        _replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dreamer


def _write_manifest(folder: Path, pc: PretrainConfig, gc: GlyphConfig, digest: str) -> dict:
    """Write ``manifest.json`` (last: its presence marks a complete folder)."""
    files = {
        p.relative_to(folder).as_posix(): _sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    missing = [f for f in WEIGHT_FILES if f not in files]
    if missing:
        raise RuntimeError(f"{folder}: the saved dreamer lacks {missing}; nothing was written")
    manifest = {
        "format": 1,
        "key": dreamer_key(pc, gc),
        "fingerprint": _fingerprint(pc, gc),
        "command": pretrain_command(pc, gc),
        "weights_sha256": _sha256_json({f: files[f] for f in WEIGHT_FILES}),
        "weights_digest": digest,
        "files": files,
        "versions": _versions(),
    }
    atomic_write(folder / MANIFEST_NAME, json.dumps(manifest, indent=2), what="the manifest")
    return manifest


_DEVICE_WORDS = (
    "cuda",
    "cudnn",
    "cublas",
    "nccl",
    "hip error",
    "device-side",
    "out of memory",
    "mps backend",
    "xpu",
)


def is_device_error(err: BaseException) -> bool:
    """Whether ``err`` comes from the accelerator (CUDA/ROCm/MPS: out of memory, a busy or
    failed device, a driver error), not from the files being loaded."""
    kinds = tuple(
        k
        for k in (
            getattr(torch.cuda, "OutOfMemoryError", None),
            getattr(torch, "AcceleratorError", None),
        )
        if k
    )
    if kinds and isinstance(err, kinds):
        return True
    return isinstance(err, RuntimeError) and any(w in str(err).lower() for w in _DEVICE_WORDS)


def _load_folder(
    folder: Path, *, device: str | torch.device | None, overrides: dict[str, Any]
) -> Dreamer:
    """Verify and load a folder (on the CPU its float weights are float32)."""
    verify_dreamer_dir(folder)
    dev = resolve_device(device)
    try:
        dreamer = Dreamer.from_pretrained(folder, device=dev, **overrides)
    except Exception as err:  # a loader error means: this folder cannot be used ...
        if is_device_error(err):  # ... unless the device failed: the folder is not to blame
            raise
        raise DreamerFolderError(folder, f"does not load ({type(err).__name__}: {err})") from err
    if dev.type == "cpu" and dreamer.dtype != torch.float32:
        dreamer = dreamer.to(torch.float32)
    return dreamer


def offline_dreamer_available(
    cache_dir: str | os.PathLike | None = None,
    *,
    image_size: int = NATIVE_SIZE,
    channels: int = 1,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    lr: float | None = None,
    config: PretrainConfig | None = None,
    glyph_config: GlyphConfig | None = None,
) -> str | None:
    """Where :func:`load_or_pretrain_offline_dreamer` would get this dreamer without pretraining.

    ``"shipped"``, ``"cache"`` or ``None`` (it would be pretrained first). The arguments are the
    native settings, as for :func:`load_or_pretrain_offline_dreamer`; files are hash-checked on
    load, not here.
    """
    pc, gc = resolve_pretrain_config(
        image_size=image_size,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        lr=lr,
        config=config,
        glyph_config=glyph_config,
        channels=channels,
    )
    key = dreamer_key(pc, gc)
    if key in shipped_dreamers():
        return "shipped"
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return "cache" if (root / key / CONFIG_NAME).is_file() else None


def load_or_pretrain_offline_dreamer(
    cache_dir: str | os.PathLike | None = None,
    *,
    image_size: int = NATIVE_SIZE,
    channels: int = 1,
    output_size: int | None = None,
    output_channels: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    lr: float | None = None,
    config: PretrainConfig | None = None,
    glyph_config: GlyphConfig | None = None,
    progress: bool = True,
    device: str | torch.device | None = "cpu",
) -> Dreamer:
    """The offline glyph dreamer: shipped, cached, or pretrained into the cache first.

    Two kinds of arguments:

    * **native** settings choose the model -- ``image_size`` (the side it is trained and
      generates at), ``channels`` (1: grey glyph world, 3: coloured glyphs), ``steps``,
      ``seed``, ``batch_size``, ``lr``, ``config``, ``glyph_config``;
    * **output** settings map its images to a learner -- ``output_size`` / ``output_channels``
      (bilinear resize, grey repeated to RGB or RGB to luminance); they never need pretraining.

    So a 28 px grey or a 32 px RGB learner keeps the defaults (the shipped 16 px grey dreamer)
    and passes ``output_size=28`` / ``output_size=32, output_channels=3``; only another
    *native* setting (e.g. ``image_size=28``, ``channels=3``) pretrains a new dreamer (about
    14 minutes on one CPU core at the default 600 steps). The model comes from, in order:

    1. the package's shipped dreamer when the native settings match it exactly;
    2. the cache ``cache_dir/<dreamer_key>``;
    3. a pretraining into that cache folder (atomic: temporary folder, then rename).

    A cached folder that fails its hashes or does not load is reported (warning naming its path),
    moved aside as ``<folder>.broken-<time>`` and pretrained again. The returned dreamer has an
    ``offline_source`` dict: ``source`` (``"shipped"``, ``"cache"`` or ``"pretrained"``),
    ``path``, ``key``, ``native_shape`` and ``output_shape``.

    Args:
        cache_dir: parent folder of the cache (default :func:`default_cache_dir`).
        image_size: native side (default :data:`NATIVE_SIZE`, the shipped dreamer's).
        channels: native glyph world: 1 (grey, shipped) or 3 (coloured glyphs).
        output_size: side of the images the learner takes (``None``: native).
        output_channels: channels the learner takes, 1 or 3 (``None``: native).
        steps: training steps (default ``PretrainConfig.steps``).
        seed: training seed.
        batch_size: training batch size (default ``PretrainConfig.batch_size``).
        lr: peak learning rate (default ``PretrainConfig.lr``).
        config: full pretraining settings (see :func:`resolve_pretrain_config`).
        glyph_config: the glyph world's settings.
        progress: tqdm bars while pretraining.
        device: where to load it (``None``: CUDA when available).
    """
    if output_size is not None and int(output_size) < 1:
        raise ValueError(f"output_size must be >= 1, got {output_size}")
    if output_channels not in (None, 1, 3):
        raise ValueError(f"output_channels must be 1 or 3 (grey or RGB), got {output_channels}")
    pc, gc = resolve_pretrain_config(
        image_size=image_size,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        lr=lr,
        config=config,
        glyph_config=glyph_config,
        channels=channels,
    )
    key = dreamer_key(pc, gc)
    overrides: dict[str, Any] = {}
    if output_size is not None and int(output_size) != pc.image_size:
        overrides["output_size"] = int(output_size)
    if output_channels is not None and output_channels != channels:
        overrides["output_channels"] = output_channels

    dreamer, source, folder = None, None, None
    shipped = shipped_dreamers().get(key)
    if shipped is not None:
        try:
            dreamer = _load_folder(shipped, device=device, overrides=overrides)
            source, folder = "shipped", shipped
        except DreamerFolderError as err:
            warnings.warn(
                f"the shipped offline dreamer is damaged ({err}); reinstall avalanche-d2l. "
                "Using the cache instead (pretraining it there if missing).",
                stacklevel=2,
            )
    if dreamer is None:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        folder = root / key
        if folder.exists():
            try:
                dreamer, source = _load_folder(folder, device=device, overrides=overrides), "cache"
            except DreamerFolderError as err:
                aside = set_aside(folder, "broken", stamped=True)
                warnings.warn(
                    f"the cached offline dreamer {folder} cannot be used ({err.reason}); moved it "
                    f"to {aside} and pretraining it again",
                    stacklevel=2,
                )
        if dreamer is None:
            if progress:
                print(
                    f"pretraining the offline glyph dreamer into {folder} (once; "
                    f"{pc.steps} steps, about {max(1, round(pc.steps * 1.4 / 60))} min on one "
                    "CPU core at the default size)",
                    file=sys.stderr,
                )
            pretrain_offline_dreamer(
                folder,
                image_size=pc.image_size,
                steps=pc.steps,
                batch_size=pc.batch_size,
                seed=pc.seed,
                lr=pc.lr,
                config=pc,
                glyph_config=gc,
                channels=channels,
                progress=progress,
            )
            dreamer = _load_folder(folder, device=device, overrides=overrides)
            source = "pretrained"
    dreamer.offline_source = {
        "source": source,
        "path": str(folder),
        "key": key,
        "native_shape": (channels, pc.image_size, pc.image_size),
        "output_shape": tuple(dreamer.output_shape),
    }
    logger.info(
        "offline dreamer: %s %s (%s), native %s mapped to %s",
        source,
        key,
        folder,
        dreamer.offline_source["native_shape"],
        dreamer.offline_source["output_shape"],
    )
    return dreamer


# ------------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    """``avalanche-d2l pretrain-dreamer`` (:mod:`.pretrain_cli`)."""
    from .pretrain_cli import main as cli_main

    return cli_main(argv)
