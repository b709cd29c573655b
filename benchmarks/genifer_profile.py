"""Where a Genifer GAN step spends its time (CPU, cProfile), at a fixed augmentation probability.

The CPU preset at 16 px (``small_cnn`` classifier, features at ``block3``), a phase with old
classes (previous generator and self-distillation included), the augmentation probability held
at ``--p`` (the adaptive update switched off), ``--steps`` steps after 5 warm-up steps. Reports
the cumulative time of the augmentation's forward pass, autograd's backward (every backward,
the augmentation's included), the convolutions, pooling, Adam and the EMA update.

Writes ``benchmarks/results/genifer_profile.json`` and ``.md``::

    python benchmarks/genifer_profile.py --p 0.5 --steps 40
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avalanche_d2l.experiments.report import atomic_write  # noqa: E402
from avalanche_d2l.genifer import GeniferConfig, GeniferPlugin  # noqa: E402
from avalanche_d2l.models.classifiers import small_cnn  # noqa: E402
from avalanche_d2l.models.feature_gan import frozen_copy  # noqa: E402
from avalanche_d2l.scenarios import tensor_benchmark  # noqa: E402

PARTS = {
    "augmentation (forward)": "augment",
    "autograd backward (all)": "run_backward",
    "conv2d (forward)": "conv2d",
    "max_pool2d (forward)": "max_pool2d",
    "Adam": "_single_tensor_adam",
    "EMA": "_foreach_lerp_",
}


def cpu16_phase():
    """``(plugin, model, experience)``: the CPU preset at 16 px on an untrained ``small_cnn``
    (teacher from ``freeze_teacher``, as after an experience) and a synthetic experience of two
    new classes, classes 0 and 1 counted as learnt (a phase with the previous generator and
    self-distillation); the GAN phase runs ``--steps`` fixed steps, without fidelity checks."""
    cfg = GeniferConfig(
        num_classes=10,
        generator={"output_range": (0.0, 1.0)},
        gan={"stop": "fixed", "measure_fidelity": False},
        progress=False,
    )
    model = small_cnn(10, 1)
    plugin = GeniferPlugin(feature_layer="block3", config=cfg)
    plugin.build_models(image_shape=(1, 16, 16), num_classes=10, classifier=frozen_copy(model))
    plugin.freeze_teacher(model)  # as after an experience (channels-last on CPU)
    x = torch.rand(128, 1, 16, 16)
    y = torch.arange(2).repeat_interleave(64) + 2
    exp = tensor_benchmark(x, y, x, y, n_experiences=1).train_stream[0]
    plugin.generated_classes = [0, 1]
    return plugin, model, exp


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    plugin, _, exp = cpu16_phase()
    ada = plugin.gan.ada
    ada.reset = lambda: None  # hold p where it is set
    ada.adjust = lambda: None
    ada.p.fill_(args.p)
    plugin.train_gan(experience=exp, steps=5)  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    plugin.train_gan(experience=exp, steps=args.steps)
    wall = time.perf_counter() - t0
    prof.disable()
    stats = pstats.Stats(prof).stats
    parts = {
        label: sum(v[3] for k, v in stats.items() if name in k[2]) for label, name in PARTS.items()
    }
    result = {
        "setting": "cpu16 (small_cnn, block3, 1x16x16, batch 64, old classes)",
        "p": args.p,
        "steps": args.steps,
        "wall_s": wall,
        "steps_per_s": args.steps / wall,
        "cumulative_s": parts,
        "load_average": list(os.getloadavg()),
        "torch": torch.__version__,
    }
    out = ROOT / "benchmarks" / "results" / "genifer_profile"
    atomic_write(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Genifer GAN step profile (CPU, 1 thread, p = {args.p}, {args.steps} steps)",
        "",
        f"{result['steps_per_s']:.2f} steps/s under profiling; load average "
        f"{result['load_average'][0]:.1f} (shared machine: compare shares, not times).",
        "",
        "| part | cumulative s (nested calls overlap) | share of the phase |",
        "|---|---|---|",
        *(f"| {k} | {v:.2f} | {100 * v / wall:.0f}% |" for k, v in parts.items()),
        "",
    ]
    atomic_write(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
