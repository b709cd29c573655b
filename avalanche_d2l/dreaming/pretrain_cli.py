"""``avalanche-d2l pretrain-dreamer``: the command line of :mod:`.pretrain`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .glyphs import GlyphConfig
from .pretrain import (
    MANIFEST_NAME,
    NATIVE_SIZE,
    PretrainConfig,
    default_cache_dir,
    dreamer_key,
    pretrain_offline_dreamer,
    resolve_pretrain_config,
    shipped_dreamers,
    weights_digest,
)


def _int_at_least(low: int):
    """argparse type: a whole number >= ``low``, or one sentence saying what is wrong."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def _parser() -> argparse.ArgumentParser:
    d = PretrainConfig()
    p = argparse.ArgumentParser(
        prog="avalanche-d2l pretrain-dreamer",
        description="Pretrain the offline glyph dreamer (conditional pixel diffusion on font "
        "glyphs, no digits) and its reference classifier on CPU. The package ships the default "
        "16 px grey dreamer; this command reproduces it or makes others.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder, new or a dreamer folder (replaced as a whole); default: the cache "
        f"the strategies read, {default_cache_dir()}/<settings key>",
    )
    p.add_argument(
        "--image-size",
        type=_positive_int,
        default=NATIVE_SIZE,
        help=f"native image side (>= 8, a multiple of 4; default {NATIVE_SIZE})",
    )
    p.add_argument(
        "--channels",
        type=int,
        default=1,
        choices=(1, 3),
        help="1: grey glyphs (default); 3: coloured glyphs",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=d.steps,
        help=f"denoiser training steps (default {d.steps})",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=d.batch_size,
        help=f"glyph images per step (default {d.batch_size})",
    )
    p.add_argument(
        "--lr", type=_positive_float, default=d.lr, help=f"peak learning rate (default {d.lr})"
    )
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument(
        "--glyphs",
        default=None,
        help="the glyph set, one concept per character (no digits; default: Latin, "
        "Greek and symbols)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is fastest on a busy "
        "2-core machine and is what the shipped dreamer used)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``avalanche-d2l pretrain-dreamer``: pretrain the glyph dreamer into a folder."""
    p = _parser()
    args = p.parse_args(argv)
    try:
        glyph_config = GlyphConfig(chars=args.glyphs) if args.glyphs is not None else None
        pc, gc = resolve_pretrain_config(
            image_size=args.image_size,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            lr=args.lr,
            glyph_config=glyph_config,
            channels=args.channels,
        )
    except ValueError as err:
        p.error(str(err))
    key = dreamer_key(pc, gc)
    out = args.out if args.out is not None else default_cache_dir() / key
    if args.threads:
        torch.set_num_threads(args.threads)
    shipped = shipped_dreamers().get(key)
    if shipped is not None:
        print(
            f"these are the settings of the shipped dreamer ({shipped}); the strategies use "
            "that copy, this run reproduces it",
            file=sys.stderr,
        )
    try:
        dreamer = pretrain_offline_dreamer(
            out,
            image_size=pc.image_size,
            steps=pc.steps,
            batch_size=pc.batch_size,
            seed=pc.seed,
            lr=pc.lr,
            glyph_config=glyph_config,
            progress=not args.no_progress,
            channels=args.channels,
        )
    except (ValueError, OSError) as err:
        print(f"avalanche-d2l pretrain-dreamer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: {out} was left as it was", file=sys.stderr)
        return 130
    info = dreamer.training_info
    digest = weights_digest(dreamer)
    print(f"saved to {out}")
    print(f"loss {info['loss_first']:.4f} -> {info['loss_final']:.4f} in {info['train_seconds']} s")
    print(
        "reference accuracy on dreamer samples:",
        json.dumps(info["reference_accuracy_on_samples"]),
        f"(chance {info['chance']:.3f})",
    )
    print(f"weights digest {digest}")
    if shipped is not None:
        ref = json.loads((shipped / MANIFEST_NAME).read_text()).get("weights_digest")
        same = "identical to" if ref == digest else "different from"
        print(f"{same} the shipped dreamer's weights ({ref})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
