"""Genifer's CPU memory layout: the default layout against channels-last, one thread.

Measures, in one process and alternating the two layouts:

1. ``small_cnn`` up to ``block3`` on 64 images of 1x16x16: forward and backward to the input (as
   in a GAN step through the frozen teacher) and forward without gradients;
2. max pooling of a 64x32x16x16 map;
3. GAN steps/s of the CPU preset (a phase with old classes) with the teacher from
   ``GeniferPlugin.freeze_teacher`` (channels-last) against a plain frozen copy (default layout);
   the generator is channels-last in both, as in a run.

Writes ``benchmarks/results/genifer_cost/genifer_layout.json`` and ``.md``::

    python benchmarks/genifer_layout.py --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genifer_profile import cpu16_phase  # noqa: E402  (beside this file)

from avalanche_d2l.experiments.report import atomic_write  # noqa: E402
from avalanche_d2l.models.classifiers import small_cnn  # noqa: E402
from avalanche_d2l.models.feature_gan import frozen_copy  # noqa: E402

CL = torch.channels_last


def ms(fn, n: int = 30) -> float:
    """Mean milliseconds of ``fn()`` over ``n`` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def op_timings() -> dict[str, tuple[float, float]]:
    """(default layout, channels-last) milliseconds of the teacher's passes and of max pooling."""
    plain = frozen_copy(small_cnn(10, 1))
    last = copy.deepcopy(plain).to(memory_format=CL)
    x = torch.rand(64, 1, 16, 16, requires_grad=True)
    h = torch.randn(64, 32, 16, 16)

    def to_block3(m, inp):
        return m.block3(m.block2(m.block1(inp)))

    def backward(m):
        to_block3(m, x).sum().backward()

    def forward(m):
        with torch.no_grad():
            to_block3(m, x)

    return {
        "small_cnn forward + backward to the input, ms": (
            ms(lambda: backward(plain)),
            ms(lambda: backward(last)),
        ),
        "small_cnn forward without gradients, ms": (
            ms(lambda: forward(plain)),
            ms(lambda: forward(last)),
        ),
        "max pooling 64x32x16x16, ms": (
            ms(lambda: F.max_pool2d(h, 2)),
            ms(lambda: F.max_pool2d(h.contiguous(memory_format=CL), 2)),
        ),
    }


def gan_steps(repeats: int, steps: int) -> dict[str, list[float]]:
    """GAN steps/s with the teacher in each layout, alternating, ``repeats`` times."""
    plugin, model, exp = cpu16_phase()
    teachers = {"default layout": frozen_copy(model), "channels-last": plugin.teacher}
    plugin.train_gan(experience=exp, steps=3)  # warm-up
    out: dict[str, list[float]] = {k: [] for k in teachers}
    for _ in range(repeats):
        for name, teacher in teachers.items():
            plugin.teacher = teacher
            t0 = time.perf_counter()
            plugin.train_gan(experience=exp, steps=steps)
            out[name].append(steps / (time.perf_counter() - t0))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ops = op_timings()
    steps = gan_steps(args.repeats, args.steps)
    result = {
        "ops_ms_default_vs_channels_last": ops,
        "gan_steps_per_s": steps,
        "repeats": args.repeats,
        "steps": args.steps,
        "load_average": list(os.getloadavg()),
        "torch": torch.__version__,
    }
    out = ROOT / "benchmarks" / "results" / "genifer_cost" / "genifer_layout"
    atomic_write(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    lines = [
        "# Genifer's CPU layout: default against channels-last (one thread)",
        "",
        f"`python benchmarks/genifer_layout.py --repeats {args.repeats} --steps {args.steps}`; "
        f"load average at the end {result['load_average'][0]:.1f}.",
        "",
        "| measurement | default layout | channels-last |",
        "|---|---|---|",
        *(f"| {k} | {a:.2f} | {b:.2f} |" for k, (a, b) in ops.items()),
        "| GAN steps/s, teacher in this layout (runs alternating) | "
        + " / ".join(f"{v:.2f}" for v in steps["default layout"])
        + " | "
        + " / ".join(f"{v:.2f}" for v in steps["channels-last"])
        + " |",
        "",
    ]
    atomic_write(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
