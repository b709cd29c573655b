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
import re
from pathlib import Path

from genifer_fidelity import OUT, atomic_write, phase_column, phase_steps  # the runs' script

from avalanche_d2l.genifer.config import GeniferConfig

#: Today's weight of the distillation on real images; the runs of the variants below were made
#: when it was 0 (their recorded configs say so).
KD_REAL = GeniferConfig().replay.kd_real
EARLIER = "kd_real 0 (earlier default)"
#: Tags of files that hold runs of the defaults: ``default*`` (made while ``kd_real`` was 0) and
#: ``kdreal03*`` (``--config '{"replay":{"kd_real":0.3}}'``, today's defaults). Their Genifer runs
#: are named by the ``kd_real`` each was made with, not by the file.
DEFAULT_TAGS = ("default", "kdreal03")
#: Tag of the runs of today's default made with the code after the CPU layout change (the
#: generator, teacher and probes in channels-last): the same settings, other float rounding.
LAYOUT_TAG = "layout"
LAYOUT = "default, code after the CPU layout change"
#: The files whose LwF and Replay runs are every Genifer run's references (one policy for every
#: variant: LwF and Replay run again in a later session moved by up to 0.013).
REFERENCE_TAG = "default"


def first(variant: str) -> tuple:
    """Sort key: today's default, the earlier default, then the variants by name."""
    return (variant != "default", variant != LAYOUT, variant != EARLIER, variant)


def load_runs(folder: Path) -> list[dict]:
    """Every run of every results file, tagged with its variant and the variant's changes."""
    rows = []
    for path in sorted(folder.glob("results_*.json")):
        tag = path.stem[len("results_") :]
        data = json.loads(path.read_text())
        overrides = data.get("config_overrides") or {}
        # one variant over its files: dch128, dch128_s1, dch128_digits_s2, ... are "dch128"
        variant = re.sub(r"(_(digits|28|shapes|s\d+|pool))+$", "", tag)
        for run in data["runs"]:
            name, change = variant, overrides
            kd = ((run.get("config") or {}).get("replay") or {}).get("kd_real", 0.0)
            if run["strategy"] == "genifer" and variant in DEFAULT_TAGS:
                name, change = (
                    ("default", {}) if kd == KD_REAL else (EARLIER, {"replay": {"kd_real": kd}})
                )
            elif run["strategy"] == "genifer" and variant == LAYOUT_TAG:
                name = LAYOUT  # today's default, made again with the code after the layout change
            elif run["strategy"] == "genifer" and kd == KD_REAL:  # run again on today's default
                name = f"{variant} (kd_real {kd})"
            rows.append({**run, "variant": name, "change": change, "tag_variant": variant})
    return rows


def references(rows: list[dict]) -> dict[tuple, float]:
    """``(stream, seed, "lwf" | "replay")`` -> final accuracy of the reference runs (those of
    the ``REFERENCE_TAG`` files; for a stream they do not hold, those of any file)."""
    refs = {
        (r["stream"], r["seed"], r["strategy"]): r["final_accuracy"]
        for r in rows
        if r["strategy"] in ("lwf", "replay") and r["tag_variant"] == REFERENCE_TAG
    }
    for r in rows:  # a stream added later (rgb_shapes_24): the LwF and Replay run beside it
        if r["strategy"] in ("lwf", "replay"):
            refs.setdefault((r["stream"], r["seed"], r["strategy"]), r["final_accuracy"])
    return refs


def reference(refs: dict[tuple, float], run: dict, strategy: str) -> float | None:
    """LwF's or Replay's final accuracy on ``run``'s stream and seed."""
    return refs.get((run["stream"], run["seed"], strategy))


def bar_met(refs: dict[tuple, float], run: dict) -> bool | None:
    """Issue 23's bar: the run's final accuracy >= LwF + 0.3 and >= 0.8x Replay(200) of the
    same stream and seed (``None`` without both references)."""
    acc = run["final_accuracy"]
    lwf, rep = reference(refs, run, "lwf"), reference(refs, run, "replay")
    if lwf is None or rep is None:
        return None
    return acc >= lwf + 0.3 and acc >= 0.8 * rep


def table(rows: list[dict], layer: str = "block3") -> str:
    """The markdown table: one line per (stream, seed, variant) of the Genifer runs at ``layer``."""
    refs = references(rows)
    lines = [
        "| stream | seed | variant | change | Genifer | LwF | Replay(200) | × Replay "
        "| bar met | GAN steps per phase | worst-class fidelity per phase "
        "| separability per phase | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    gen = [r for r in rows if r["strategy"] == "genifer" and r.get("layer") == layer]
    gen.sort(key=lambda r: (r["stream"], r["seed"], *first(r["variant"])))
    for r in gen:
        lwf, rep = reference(refs, r, "lwf"), reference(refs, r, "replay")
        acc = r["final_accuracy"]
        ratio = f"{acc / rep:.2f}" if rep else "-"
        met = {None: "-", True: "yes", False: "no"}[bar_met(refs, r)]
        change = json.dumps(r["change"], separators=(",", ":")) if r["change"] else "-"
        lines.append(
            f"| {r['stream']} | {r['seed']} | {r['variant']} | `{change}` | {acc:.3f} "
            f"| {'-' if lwf is None else f'{lwf:.3f}'} | {'-' if rep is None else f'{rep:.3f}'} "
            f"| {ratio} | {met} | {phase_steps(r)} | {phase_column(r, 'probe_min')} "
            f"| {phase_column(r, 'separability')} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict], layer: str = "block3") -> str:
    """Per variant and stream: the final accuracy of each seed, their mean, and on how many
    seeds the bar is met (``-`` where the variant was not run on that stream)."""
    refs = references(rows)
    gen = [r for r in rows if r["strategy"] == "genifer" and r.get("layer") == layer]
    streams = sorted({r["stream"] for r in gen})
    variants = sorted({r["variant"] for r in gen}, key=first)
    lines = [
        "| variant | change | " + " | ".join(streams) + " | bar met |",
        "|---|---|" + "---|" * len(streams) + "---|",
    ]
    for v in variants:
        mine = [r for r in gen if r["variant"] == v]
        change = json.dumps(mine[0]["change"], separators=(",", ":")) if mine[0]["change"] else "-"
        cells, met, runs = [], 0, 0
        for stream in streams:
            here = sorted((r for r in mine if r["stream"] == stream), key=lambda r: r["seed"])
            accs = [r["final_accuracy"] for r in here]
            if not accs:
                cells.append("-")
                continue
            text = " / ".join(f"{a:.3f}" for a in accs)
            cells.append(text + (f" ({sum(accs) / len(accs):.3f})" * (len(accs) > 1)))
            for r in here:
                ok = bar_met(refs, r)
                if ok is not None:
                    runs += 1
                    met += ok
        lines.append(f"| {v} | `{change}` | " + " | ".join(cells) + f" | {met} of {runs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=OUT)
    parser.add_argument("--layer", default="block3")
    args = parser.parse_args(argv)
    runs = load_runs(args.folder)
    text = (
        "# Genifer's generator, one change at a time (user CNN, feature layer "
        f"`{args.layer}`, default arguments otherwise)\n\n"
        "Made by `python benchmarks/genifer_one_change.py` from the `results_<tag>.json` "
        "files beside it (each made by `python benchmarks/genifer_fidelity.py ... "
        "--config '<change>' --tag <tag>`). "
        "Bar met: final accuracy >= LwF + 0.3 and >= 0.8x Replay(200) of the same stream and seed "
        "(LwF and Replay: the runs of the `results_default*` files, for every variant; on "
        "`rgb_shapes_24`, a held-out stream added later, the runs of its own file). "
        "`default`: today's defaults (`replay.kd_real=0.3`, the `kdreal03*` files); "
        "`kd_real 0 (earlier default)`: the defaults before it (the `default*` files, "
        "`replay.kd_real=0`); every other variant is one change on top of the earlier default. "
        f"`{LAYOUT}`: today's defaults again (the `{LAYOUT_TAG}*` files), made with the code "
        "that runs the generator, the teacher and the probes in channels-last on CPU (the "
        "same settings, other float rounding; the other rows predate it). "
        "Wall times were taken with two runs sharing the 2 cores: not cost figures.\n\n"
        + "Per variant: final accuracy on seeds 0 / 1 / 2 of each stream (mean), and the runs "
        "whose bar is met.\n\n"
        + summary(runs, args.layer)
        + "\n\nPer run:\n\n"
        + table(runs, args.layer)
        + "\n"
    )
    out = args.folder / "one_change.md"
    atomic_write(out, text)
    print(text)


if __name__ == "__main__":
    main()
