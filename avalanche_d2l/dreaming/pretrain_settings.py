"""The settings of an offline-dreamer pretraining: checked, fingerprinted, named and written
back as the command that reproduces them (:mod:`.pretrain` trains and loads)."""

from __future__ import annotations

import dataclasses
from typing import Any

from .folders import _sha256_json
from .glyphs import DEFAULT_GLYPHS, GlyphConfig
from .training import RECIPE_VERSION, PretrainConfig

__all__ = ["dreamer_key", "pretrain_command", "resolve_pretrain_config"]


def resolve_pretrain_config(
    *,
    image_size: int = 16,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    lr: float | None = None,
    config: PretrainConfig | None = None,
    glyph_config: GlyphConfig | None = None,
    channels: int = 1,
) -> tuple[PretrainConfig, GlyphConfig]:
    """The full, checked settings a pretraining with these arguments uses.

    ``(PretrainConfig, GlyphConfig)``; together they determine the weights (see
    :func:`dreamer_key`). A short run (``steps`` below the default, no ``config``) also shortens
    the reference classifier's training and the sample check, which would otherwise dominate it.

    Raises:
        ValueError: an invalid setting (one sentence saying which and what is allowed).
    """
    pc = dataclasses.replace(config or PretrainConfig(), image_size=int(image_size), seed=int(seed))
    if steps is not None:
        pc.steps = int(steps)
        if config is None and pc.steps < PretrainConfig.steps:
            pc.reference_steps = min(pc.reference_steps, max(30, 2 * pc.steps))
            pc.eval_per_class = 1
    if batch_size is not None:
        pc.batch_size = int(batch_size)
    if lr is not None:
        pc.lr = float(lr)
    if pc.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"prediction_type must be 'epsilon' or 'v_prediction', got {pc.prediction_type!r}"
        )
    if pc.steps < 1:
        raise ValueError(f"steps must be >= 1, got {pc.steps}")
    if pc.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {pc.batch_size}")
    if not pc.lr > 0:
        raise ValueError(f"lr must be > 0, got {pc.lr}")
    if pc.seed < 0:
        raise ValueError(f"seed must be >= 0, got {pc.seed}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    levels = len(pc.block_out_channels)
    step = 2 ** (levels - 1)
    if pc.image_size < 8 or pc.image_size % step:
        raise ValueError(
            f"image_size must be >= 8 and a multiple of {step} (the UNet halves it "
            f"{levels - 1} times), got {pc.image_size}; other learner sizes are served by "
            "mapping a dreamer's output (load_or_pretrain_offline_dreamer(output_size=...))"
        )
    gc = dataclasses.replace(
        glyph_config or GlyphConfig(), image_size=pc.image_size, color=channels == 3
    )
    if len(gc.chars) < 2:
        raise ValueError(f"the glyph set needs at least 2 characters, got {gc.chars!r}")
    return pc, gc


def _fingerprint(pc: PretrainConfig, gc: GlyphConfig) -> dict[str, Any]:
    return {"recipe_version": RECIPE_VERSION, "pretrain": pc.to_dict(), "glyphs": gc.to_dict()}


def dreamer_key(pc: PretrainConfig, gc: GlyphConfig) -> str:
    """Folder name of a dreamer: readable prefix + 12 hex of the hash of every setting.

    The prefix names the main settings (recipe version, colour, size, steps, batch size, seed);
    the hash covers all of :class:`PretrainConfig` (learning rate, widths, EMA, reference
    classifier...) and :class:`GlyphConfig` (glyph set, jitter), so settings that change the
    weights never share a folder.
    """
    colour = "_rgb" if gc.color else ""
    h = _sha256_json(_fingerprint(pc, gc))[:12]
    return (
        f"glyph_dreamer_v{RECIPE_VERSION}{colour}_s{pc.image_size}_n{pc.steps}"
        f"_b{pc.batch_size}_seed{pc.seed}_{h}"
    )


def pretrain_command(pc: PretrainConfig, gc: GlyphConfig, out: str | None = None) -> str | None:
    """The ``avalanche-d2l pretrain-dreamer`` command that reproduces these settings.

    ``None`` when a setting has no command-line flag (made through the Python API).
    """
    flags = {"image_size", "steps", "batch_size", "lr", "seed"}
    base = resolve_pretrain_config(
        image_size=pc.image_size,
        steps=pc.steps,
        batch_size=pc.batch_size,
        seed=pc.seed,
        lr=pc.lr,
        channels=3 if gc.color else 1,
    )
    same_pc = {k: v for k, v in pc.to_dict().items() if k not in flags} == {
        k: v for k, v in base[0].to_dict().items() if k not in flags
    }
    same_gc = {k: v for k, v in gc.to_dict().items() if k != "chars"} == {
        k: v for k, v in base[1].to_dict().items() if k != "chars"
    }
    if not (same_pc and same_gc):
        return None
    parts = ["avalanche-d2l", "pretrain-dreamer"]
    if out is not None:
        parts += ["--out", out]
    parts += [
        "--image-size",
        str(pc.image_size),
        "--channels",
        "3" if gc.color else "1",
        "--steps",
        str(pc.steps),
        "--batch-size",
        str(pc.batch_size),
        "--lr",
        repr(pc.lr),
        "--seed",
        str(pc.seed),
    ]
    if gc.chars != DEFAULT_GLYPHS:
        parts += ["--glyphs", "'" + gc.chars.replace("'", "'\\''") + "'"]
    return " ".join(parts + ["--threads", "1"])


def _cache_name(image_size: int, steps: int, seed: int, channels: int = 1) -> str:
    """Folder name of the default-settings dreamer of this native size/steps/seed/channels
    (kept for callers of the old API; prefer :func:`dreamer_key`)."""
    return dreamer_key(
        *resolve_pretrain_config(image_size=image_size, steps=steps, seed=seed, channels=channels)
    )
