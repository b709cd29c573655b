"""Where ER + D2L spends its time on CPU (cProfile): one run of the comparison's setting.

The shipped ``split_digits`` experiment (``small_cnn``, Adam 1e-3, 10 epochs, buffer 100), the
registered ``d2l`` strategy with its defaults, one seed, one torch thread, in this process under
``cProfile``. Reports the cumulative time of D2L's parts (the dreaming loop and its steps, the
prompts' fitting to buffer images, the oracle, the dream loss while an experience trains, the
head assignment) beside Avalanche's training epochs and the run's wall time. Parts nest (the
dreaming loop contains its prompt steps and the dream set's generation), so they do not add up.

Writes ``benchmarks/results/d2l_profile.json`` and ``.md``::

    python benchmarks/d2l_profile.py --seed 0
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avalanche_d2l.core.storage import atomic_write  # noqa: E402
from avalanche_d2l.experiments import default_experiment, run_experiment  # noqa: E402

#: part -> (file suffix, function name) of the profiled function
PARTS = {
    "run (training + evaluation + dreaming)": ("experiments/one_run.py", "train_with_checkpoints"),
    "Avalanche training epochs (incl. the dream loss)": (
        "update_type/sgd_update.py",
        "training_epoch",
    ),
    "Avalanche evaluation": ("templates/base_sgd.py", "eval"),
    "D2L after an experience (dreaming, inventory, cache)": ("d2l/plugin.py", "after_training_exp"),
    "  planning the dream classes": ("d2l/inventory.py", "plan_jobs"),
    "    prompts fitted to buffer images (textual inversion)": ("d2l/prompts.py", "_invert"),
    "  the dreaming loop": ("d2l/dreaming.py", "dream"),
    "    prompt steps: rendering with graph": ("d2l/dreaming.py", "_render"),
    "    the dream set: generation without graph": ("d2l/dreaming.py", "_generate"),
    "D2L dream loss while an experience trains": ("d2l/plugin.py", "before_backward"),
    "D2L head assignment": ("d2l/plugin.py", "assign_heads"),
}


def _cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    return sum(
        row[3]
        for (path, _, func), row in stats.stats.items()  # type: ignore[attr-defined]
        if func == name and path.replace(os.sep, "/").endswith(suffix)
    )


def _inversion_split() -> dict:
    """Time one textual inversion's two parts (choosing the starting concept by its denoising
    loss, then the Adam steps) on the stream's dreamer, with a class's share of the buffer."""
    from avalanche_d2l.d2l.config import DreamConfig
    from avalanche_d2l.d2l.prompts import _invert
    from avalanche_d2l.dreaming import load_or_pretrain_offline_dreamer

    dreamer = load_or_pretrain_offline_dreamer(progress=False)
    config = DreamConfig()
    anchors = torch.rand(50, 1, 16, 16)  # buffer 100 over the first experience's two classes
    times = {}
    for label, steps in (("choose_s", 0), ("with_steps_s", config.invert_steps)):
        t0 = time.perf_counter()
        _invert(dreamer, anchors, DreamConfig(invert_steps=steps), torch.Generator().manual_seed(0))
        times[label] = time.perf_counter() - t0
    return {
        "anchors": anchors.shape[0],
        "concepts": int(dreamer.concept_embeddings().shape[0]),
        "invert_steps": config.invert_steps,
        "choose_s": times["choose_s"],
        "steps_s": times["with_steps_s"] - times["choose_s"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    exp = default_experiment("split_digits")
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        results = run_experiment(
            exp, out=tmp, strategies=["d2l"], seeds=[args.seed], progress=False, log=lambda m: None
        )
        prof.disable()
        wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    split = _inversion_split()
    parts = {label: _cumulative(stats, *where) for label, where in PARTS.items()}
    run = results["runs"][0]
    report = {
        "command": "python benchmarks/d2l_profile.py " + " ".join(argv or sys.argv[1:]),
        "seed": args.seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_before": [round(x, 2) for x in load],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s_profiled": wall,
        "lab_final_accuracy": run.get("lab_final_accuracy"),
        "parts_s": parts,
        "one_inversion_s": split,
    }
    lines = [
        "# Where ER + D2L spends its time (CPU, cProfile)",
        "",
        f"`{report['command']}`: the shipped `split_digits` experiment, registered `d2l` with its "
        f"defaults, seed {args.seed}, {report['threads']} torch thread; load average (1, 5, 15 "
        f"min) before {report['load_average_before']}, after {report['load_average_after']}. "
        "Profiling slows Python-heavy code more than torch kernels; the shares are indicative. "
        "Parts nest (indented ones are inside the one above).",
        "",
        f"Wall time under the profiler: {wall:.1f} s; lab final accuracy "
        f"{report['lab_final_accuracy']:.3f}.",
        "",
        "| part | cumulative s | share of the run |",
        "|---|---|---|",
    ]
    total = parts["run (training + evaluation + dreaming)"] or wall
    for label, seconds in parts.items():
        name = label.replace("  ", "&nbsp;&nbsp;")
        lines.append(f"| {name} | {seconds:.1f} | {seconds / total:.0%} |")
    lines += [
        "",
        f"One inversion outside the profiler ({split['anchors']} random buffer-size images, "
        f"{split['concepts']} concepts of the offline dreamer): choosing the starting concept "
        f"{split['choose_s']:.2f} s, the {split['invert_steps']} Adam steps "
        f"{split['steps_s']:.2f} s.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "d2l_profile.json", json.dumps(report, indent=1))
    atomic_write(args.out / "d2l_profile.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
