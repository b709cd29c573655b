"""Genifer's generator, one change at a time: a table from the runs of ``genifer_fidelity.py``.

Every ``results_<tag>.json`` under ``benchmarks/results/genifer_fidelity/`` holds the runs of one
variant (its ``config_overrides``; ``default`` and ``default_<suffix>`` hold the defaults, with
LwF and Replay(200) on the same model and seed). This script writes ``one_change.md`` there: per
stream and seed, each variant's final accuracy beside the default's, LwF and Replay, its ratio to
Replay (issue 23's bar: LwF + 0.3 and 0.8x Replay), the GAN steps, the worst class's replay
fidelity and the separability of every phase. It trains nothing.

    python benchmarks/genifer_fidelity.py --streams split_color_digits --layers block3 --seeds 0 \
        --strategies genifer --config '{"discriminator": {"channels": 128}}' --tag dch128
    python benchmarks/genifer_one_change.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from genifer_fidelity import OUT, atomic_write, phase_column, phase_steps  # the runs' script


def load_runs(folder: Path) -> list[dict]:
    """Every run of every results file, tagged with its variant and the variant's changes."""
    rows = []
    for path in sorted(folder.glob("results_*.json")):
        tag = path.stem[len("results_") :]
        data = json.loads(path.read_text())
        overrides = data.get("config_overrides") or {}
        variant = "default" if tag == "default" or tag.startswith("default_") else tag
        for run in data["runs"]:
            rows.append({**run, "variant": variant, "change": overrides, "file": path.name})
    return rows


def table(rows: list[dict], layer: str = "block3") -> str:
    """The markdown table: one line per (stream, seed, variant) of the Genifer runs at ``layer``."""
    refs: dict[tuple, float] = {}
    for r in rows:
        if r["strategy"] in ("lwf", "replay"):
            refs[(r["stream"], r["seed"], r["strategy"])] = r["final_accuracy"]
    lines = [
        "| stream | seed | variant | change | Genifer | LwF | Replay(200) | × Replay "
        "| bar met | GAN steps per phase | worst-class fidelity per phase "
        "| separability per phase | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    gen = [r for r in rows if r["strategy"] == "genifer" and r.get("layer") == layer]
    gen.sort(key=lambda r: (r["stream"], r["seed"], r["variant"] != "default", r["variant"]))
    for r in gen:
        lwf = refs.get((r["stream"], r["seed"], "lwf"))
        rep = refs.get((r["stream"], r["seed"], "replay"))
        acc = r["final_accuracy"]
        ratio = f"{acc / rep:.2f}" if rep else "-"
        met = (
            "-"
            if lwf is None or rep is None
            else ("yes" if acc >= lwf + 0.3 and acc >= 0.8 * rep else "no")
        )
        change = json.dumps(r["change"], separators=(",", ":")) if r["change"] else "-"
        lines.append(
            f"| {r['stream']} | {r['seed']} | {r['variant']} | `{change}` | {acc:.3f} "
            f"| {'-' if lwf is None else f'{lwf:.3f}'} | {'-' if rep is None else f'{rep:.3f}'} "
            f"| {ratio} | {met} | {phase_steps(r)} | {phase_column(r, 'probe_min')} "
            f"| {phase_column(r, 'separability')} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=OUT)
    parser.add_argument("--layer", default="block3")
    args = parser.parse_args(argv)

    text = (
        "# Genifer's generator, one change at a time (user CNN, feature layer "
        f"`{args.layer}`, default arguments otherwise)\n\n"
        "Made by `python benchmarks/genifer_one_change.py` from the `results_<tag>.json` "
        "files beside it (each made by `python benchmarks/genifer_fidelity.py ... "
        "--config '<change>' --tag <tag>`). "
        "Bar met: final accuracy >= LwF + 0.3 and >= 0.8x Replay(200) of the same stream and seed. "
        "Wall times were taken with two runs sharing the 2 cores: not cost figures.\n\n"
        + table(load_runs(args.folder), args.layer)
        + "\n"
    )
    out = args.folder / "one_change.md"
    atomic_write(out, text)
    print(text)


if __name__ == "__main__":
    main()
