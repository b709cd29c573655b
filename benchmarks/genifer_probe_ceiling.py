"""Can the fidelity probe pass the stop's threshold at all? The probe trained on *real* images.

The fidelity stop asks a small probe trained only on the replay to score >= 0.85 on every class
of held-out real images. That is only a test of the replay if the same probe, trained on the
experience's real images instead (``probe_real``, the ceiling), clears the threshold. This script
measures the ceiling exactly as a GAN phase splits its data (:func:`split_holdout` with the
monitor's seeds), for every experience of the three offline streams and each probe head
(``--pools``: 1 = global average pooling, the earlier probe; 4 = the head on 4x4 cells, the
default). It trains no generator.

    python benchmarks/genifer_probe_ceiling.py --seeds 0 1 2

Writes ``benchmarks/results/genifer_fidelity/probe_ceiling.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from genifer_fidelity import OUT, STREAMS, atomic_write  # the runs' script: same streams

from avalanche_d2l.genifer.fidelity import ProbeSettings, probe_accuracy
from avalanche_d2l.genifer.monitor import phase_seeds, split_holdout


def ceiling(stream: str, seed: int, pools: list[int], steps: int, holdout: float) -> list[dict]:
    """Per experience: the worst class's accuracy of a probe trained on real images, per head."""
    rows = []
    for exp in STREAMS[stream](seed).train_stream:
        e = int(exp.current_experience)
        split_seed, probe_seed = phase_seeds(seed, e)  # the GAN phase's split and probe draws
        _, real_train, real_test = split_holdout(
            exp.dataset, holdout, torch.Generator().manual_seed(split_seed)
        )
        classes = sorted(int(c) for c in exp.classes_in_this_experience)
        row = {"stream": stream, "seed": seed, "experience": e, "n_test": len(real_test[1])}
        for pool in pools:
            t0 = time.perf_counter()
            acc = probe_accuracy(
                *real_train,
                *real_test,
                classes,
                ProbeSettings(steps=steps, pool=pool),
                torch.Generator().manual_seed(probe_seed),
            )
            row[f"pool{pool}"] = min(acc.values())
            row[f"pool{pool}_s"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], pools: list[int], threshold: float, command: str) -> str:
    n_exp = 1 + max(r["experience"] for r in rows)
    lines = [
        "# The fidelity probe trained on real images (its ceiling), worst class per experience",
        "",
        f"Command: `{command}`. Threshold of the stop: {threshold}. One thread.",
        "",
        "| stream | seed | "
        + " | ".join(f"exp {e}" for e in range(n_exp))
        + " | below threshold |",
        "|---|---|" + "---|" * (n_exp + 1),
    ]
    for pool in pools:
        lines.append(f"| **head pooled to {pool}x{pool}** |" + " |" * (n_exp + 2))
        keys = sorted({(r["stream"], r["seed"]) for r in rows})
        for stream, seed in keys:
            vals = [r[f"pool{pool}"] for r in rows if (r["stream"], r["seed"]) == (stream, seed)]
            below = sum(v < threshold for v in vals)
            cells = " | ".join(f"{v:.2f}" for v in vals)
            lines.append(f"| {stream} | {seed} | {cells} | {below} of {len(vals)} |")
    lines += ["", "| head | experiences below threshold | worst | mean of worst classes | s |"]
    lines.append("|---|---|---|---|---|")
    for pool in pools:
        vals = [r[f"pool{pool}"] for r in rows]
        secs = sum(r[f"pool{pool}_s"] for r in rows)
        below = sum(v < threshold for v in vals)
        lines.append(
            f"| {pool}x{pool} | {below} of {len(vals)} | {min(vals):.2f} "
            f"| {sum(vals) / len(vals):.3f} | {secs:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", nargs="+", default=list(STREAMS), choices=list(STREAMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--pools", nargs="+", type=int, default=[1, 4])
    p.add_argument("--steps", type=int, default=ProbeSettings().steps)
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--threshold", type=float, default=0.85)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [
        row
        for stream in args.streams
        for seed in args.seeds
        for row in ceiling(stream, seed, args.pools, args.steps, args.holdout)
    ]
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/genifer_probe_ceiling.py", *given])
    payload = {"args": vars(args), "rows": rows}
    atomic_write(OUT / "probe_ceiling.json", json.dumps(payload, indent=1))
    atomic_write(OUT / "probe_ceiling.md", markdown(rows, args.pools, args.threshold, command))


if __name__ == "__main__":
    main()
