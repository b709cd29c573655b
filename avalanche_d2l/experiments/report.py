"""Reports of an experiment: ``results.md`` (mean ± std over seeds; the value alone for one run),
``accuracy`` (accuracy after each experience: one panel per strategy group and protocol, seeds as
a band) and ``summary`` (final accuracy and forward transfer per strategy, one dot per seed), each
figure as PNG, PDF and SVG, every method in the same colour in every figure (:func:`method_style`).
``python -m avalanche_d2l.experiments.report OUT`` redraws them from ``OUT/results.json``.

The tables headline the lab's protocol (``papers/d2l.md`` A2, B; :mod:`avalanche_d2l.evaluation`):
argmax over all output units, heads that host only a dream counted as errors, final accuracy the
mean of the per-experience accuracies. The masked figures (the model's class-space output, final
accuracy over all test samples of the seen classes) stand beside them.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

from avalanche_d2l.core.storage import atomic_write

__all__ = [
    "FIGURE_FORMATS",
    "METHOD_COLOURS",
    "METRICS",
    "PROTOCOL_NOTE",
    "atomic_write",
    "mean_std",
    "method_style",
    "results_table",
    "row_label",
    "strategy_group",
    "summarise_run",
    "write_figures",
    "write_report",
]

#: Columns of ``results.md``: (key of the run record, header). Lab protocol first.
METRICS = [
    ("lab_final_accuracy", "Final acc. (lab)"),
    ("lab_forward_transfer", "FWT (lab)"),
    ("final_accuracy", "Final acc. (masked)"),
    ("forward_transfer", "FWT (masked)"),
    ("avg_incremental_accuracy", "Avg. incr. acc. (masked)"),
    ("forgetting", "Forgetting"),
    ("bwt", "BWT"),
    ("wall_s", "Wall s"),
]

#: The legend printed under every table: which protocol is which.
PROTOCOL_NOTE = (
    "*Lab* (the D2L authors' protocol, headline): argmax over all output units, so a sample "
    "predicted on a head that hosts only a dream is an error; final accuracy = mean of the "
    "per-experience accuracies. *Masked*: the model's class-space output, where heads hosting "
    "only a dream are masked out; final accuracy = accuracy on all test samples of the classes "
    "seen (sample-weighted). FWT = accuracy on experience k at its start (after the strategy's "
    "start-of-experience step, e.g. D2L's head assignment) minus a random-initialised model's, "
    "mean over k >= 1. For a model without dream heads the two protocols differ only in how the "
    "final accuracy averages experiences. Forgetting and BWT are Avalanche's (model output)."
)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value), as in the result tables."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def summarise_run(
    strategy,
    n_trained: int,
    accuracy_matrix,
    seen_accuracy,
    *,
    lab: tuple[Sequence[Sequence[float]], Sequence[float]] = ((), ()),
) -> dict:
    """The per-run metrics of ``results.json`` from a strategy's evaluator after training.

    Args:
        strategy: the trained strategy (its evaluator holds the metrics).
        n_trained: experiences trained.
        accuracy_matrix: row k = masked accuracy on every test experience after training k.
        seen_accuracy: masked accuracy on the seen classes after each trained experience.
        lab: the lab protocol's accuracy matrix (same layout) and its mean over the trained
            experiences after each one (:data:`avalanche_d2l.evaluation.LAB_AVG_ACC`); missing
            rows (a run resumed from a checkpoint older than the lab metrics) give NaN.
    """
    from avalanche_d2l.evaluation import AIA, FWT_STREAM, ForwardTransferAtStart

    last = strategy.evaluator.get_last_metrics()
    fwt = next(m for m in strategy.evaluator.metrics if isinstance(m, ForwardTransferAtStart))
    lab_matrix, lab_avg = [list(r) for r in lab[0]], list(lab[1])
    complete = len(lab_avg) == len(seen_accuracy) and len(lab_matrix) == len(accuracy_matrix)
    lab_fwt = fwt.lab_result() if n_trained > 1 else 0.0
    return {
        "final_accuracy": seen_accuracy[-1],
        "avg_incremental_accuracy": float(last[AIA]),
        # the same mean without experience 0 (the reference Genifer code reports both)
        "avg_incremental_accuracy_wo_first": (
            statistics.fmean(seen_accuracy[1:]) if len(seen_accuracy) > 1 else float("nan")
        ),
        "forgetting": float(last.get("StreamForgetting/eval_phase/test_stream", 0.0)),
        "bwt": float(last.get("StreamBWT/eval_phase/test_stream", 0.0)),
        "forward_transfer": float(last[FWT_STREAM]) if n_trained > 1 else 0.0,
        "accuracy_matrix": accuracy_matrix,
        "seen_accuracy": seen_accuracy,
        # per experience k: accuracy at the start of its training and minus the random-init one
        "accuracy_at_start": [fwt.accuracy_at_start[k] for k in sorted(fwt.accuracy_at_start)],
        "forward_transfer_per_experience": [fwt.transfer[k] for k in sorted(fwt.transfer)],
        # the lab's protocol: argmax over all output units, mean over trained experiences
        "lab_final_accuracy": lab_avg[-1] if complete else float("nan"),
        "lab_forward_transfer": float("nan") if lab_fwt is None else float(lab_fwt),
        "lab_avg_accuracy": lab_avg,
        "lab_accuracy_matrix": lab_matrix,
        "lab_accuracy_at_start": [
            fwt.lab_accuracy_at_start[k] for k in sorted(fwt.lab_accuracy_at_start)
        ],
        "lab_forward_transfer_per_experience": [
            fwt.lab_transfer[k] for k in sorted(fwt.lab_transfer)
        ],
    }


def row_label(run: dict) -> str:
    """Table row of a run: the strategy, with its buffer size when it keeps one."""
    mem = run.get("mem_size")
    return run["strategy"] if mem is None else f"{run['strategy']} (mem {mem})"


# ---- method styles: one colour per method name, the same in every figure -----------------------

#: Fixed colours of the registered strategies. A rehearsal host and the host with D2L share a
#: colour (host dashed, ``+D2L`` solid); D2L on its default host (ER) takes Replay's.
METHOD_COLOURS = {
    "naive": "#7f7f7f",
    "cumulative": "#111111",
    "lwf": "#bcbd22",
    "ewc": "#17becf",
    "generative_replay": "#8c564b",
    "genifer": "#ff7f0e",
    "replay": "#1f77b4",
    "er_ace": "#2ca02c",
    "der": "#d62728",
    "bic": "#9467bd",
}
#: Hosts that D2L runs on (their dashed line pairs with ``<host>_d2l``'s solid one).
HOSTS = {"replay", "er_ace", "der", "bic"}
#: The package's own D2L variants (the ablation's controls), triangles in their own colours.
VARIANT_COLOURS = {
    "d2l_random": "#e377c2",
    "d2l_optimised": "#393b79",
    "d2l_optimised_away": "#8c6d31",
    "d2l_noise": "#7b4173",
    "der_d2l_sleep_only": "#843c39",
}
#: Colours and markers of any other name (a user's strategy), picked by stable hashes of the
#: name, so it keeps its style in every figure and every report.
EXTRA_COLOURS = [
    "#637939",
    "#3182bd",
    "#e6550d",
    "#31a354",
    "#756bb1",
    "#636363",
    "#ad494a",
    "#6b6ecf",
    "#bd9e39",
    "#d6616b",
    "#17becf",
    "#a55194",
]
EXTRA_MARKERS = ["D", "v", "P", "X", "*", "h"]


def method_style(strategy: str) -> dict:
    """``color``, ``linestyle`` and ``marker`` of a strategy name, fixed across figures.

    ``der@user_cnn`` is styled as ``der``; ``<host>_d2l`` (and ``d2l``, whose host is ER) take the
    host's colour with a solid line and square markers while the host itself is dashed."""
    name = strategy.split("@", 1)[0]
    if name in VARIANT_COLOURS:
        return {"color": VARIANT_COLOURS[name], "linestyle": "-", "marker": "^"}
    host = "replay" if name == "d2l" else name[: -len("_d2l")] if name.endswith("_d2l") else None
    if host in METHOD_COLOURS:
        return {"color": METHOD_COLOURS[host], "linestyle": "-", "marker": "s"}
    if name in METHOD_COLOURS:
        dashed = name in HOSTS
        return {"color": METHOD_COLOURS[name], "linestyle": "--" if dashed else "-", "marker": "o"}
    colour = EXTRA_COLOURS[zlib.crc32(name.encode()) % len(EXTRA_COLOURS)]
    marker = EXTRA_MARKERS[zlib.adler32(name.encode()) % len(EXTRA_MARKERS)]
    return {"color": colour, "linestyle": "-.", "marker": marker}


def strategy_group(run: dict) -> str:
    """The figure panel of a run: ``+ D2L``, ``rehearsal`` (keeps a buffer) or ``no buffer``."""
    if "d2l" in run["strategy"].split("@", 1)[0]:
        return "+ D2L"
    return "rehearsal" if run.get("mem_size") is not None else "no buffer"


GROUPS = ("no buffer", "rehearsal", "+ D2L")


# ---- tables -------------------------------------------------------------------------------------


def _rows(results: dict) -> list[tuple[str, list[dict]]]:
    rows: dict[str, list[dict]] = {}
    for r in results["runs"]:
        rows.setdefault(row_label(r), []).append(r)
    return list(rows.items())


def _values(runs: Sequence[dict], key: str) -> list[float]:
    """``key`` of every run that has a finite value (records older than a metric lack it)."""
    vals = [float(r[key]) for r in runs if r.get(key) is not None]
    return [v for v in vals if math.isfinite(v)]


def _cell(runs: Sequence[dict], key: str) -> str:
    """``mean ± std`` over the runs of a row; the value alone when there is one run."""
    vals = _values(runs, key)
    if not vals:
        return "n/a"
    m, s = mean_std(vals)
    digits = 1 if key == "wall_s" else 3
    text = f"{m:.{digits}f}" if len(vals) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"
    return text if len(vals) == len(runs) else f"{text} ({len(vals)} of {len(runs)})"


def _mean_curve(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    """Mean and std (0 for one curve) over curves, cut to the shortest."""
    n = min(len(c) for c in curves)
    mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
    std = [statistics.stdev(c[i] for c in curves) if len(curves) > 1 else 0.0 for i in range(n)]
    return mean, std


def results_table(results: dict) -> str:
    """``results.md``: one row per strategy (and buffer size), the columns of :data:`METRICS`
    that any run records; ``±`` only where a row has more than one run."""
    exp = results["experiment"]
    rows = _rows(results)
    seeds = sorted({r["seed"] for r in results["runs"]})
    training = exp["training"]
    first, later = training["first_experience"], training["optimizer"]
    epochs = later["epochs"] if first is None else f"{first['epochs']} (first) / {later['epochs']}"
    columns = [(k, label) for k, label in METRICS if any(_values(mine, k) for _, mine in rows)]
    spread = (
        "One run per row."
        if all(len(mine) == 1 for _, mine in rows)
        else "Mean ± std over seeds (a value without ± is a single run)."
    )
    lines = [
        f"Benchmark `{exp['benchmark']['name']}`, model `{exp['model']['name']}`, seeds {seeds}, "
        f"{epochs} epochs. {spread}",
        "",
        "| Strategy | " + " | ".join(label for _, label in columns) + " | Seeds |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for label, mine in rows:
        cells = [_cell(mine, key) for key, _ in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(mine)} |")
    lines += ["", PROTOCOL_NOTE]
    return "\n".join(lines) + "\n"


# ---- figures ------------------------------------------------------------------------------------

#: Formats written beside each other for every figure (PNG for a look, PDF and SVG for a paper).
FIGURE_FORMATS = ("png", "pdf", "svg")


def write_figures(results: dict, out: Path) -> list[Path]:
    """``accuracy`` and ``summary`` figures of ``results`` into ``out``, each as PNG, PDF and
    SVG; returns the paths written."""
    out = Path(out)
    rows = _rows(results)
    title = results["experiment"]["benchmark"]["name"]
    written = []
    for name, fig in (
        ("accuracy", _accuracy_figure(rows, title)),
        ("summary", _summary_figure(rows, title)),
    ):
        for fmt in FIGURE_FORMATS:
            written.append(out / f"{name}.{fmt}")
            _save_figure(fig, written[-1], fmt)
    return written


def write_report(results: dict, out: Path) -> list[Path]:
    """Write ``results.md`` and the figures (:func:`write_figures`) from ``results``; returns
    the paths written."""
    written = write_figures(results, out)
    atomic_write(Path(out) / "results.md", results_table(results))
    return [Path(out) / "results.md", *written]


def _curve_panels(rows) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Columns (strategy groups present) and rows (protocols with data) of the accuracy grid."""
    groups = [g for g in GROUPS if any(strategy_group(mine[0]) == g for _, mine in rows)]
    protocols = [
        ("lab_avg_accuracy", "lab", "accuracy (lab: mean over\ntrained experiences)"),
        ("seen_accuracy", "masked", "accuracy on the\nclasses seen (masked)"),
    ]
    protocols = [p for p in protocols if any(r.get(p[0]) for _, mine in rows for r in mine)]
    return groups, protocols


def _accuracy_figure(rows: list[tuple[str, list[dict]]], title: str):
    """Accuracy after each trained experience: one column per strategy group, one row per
    protocol (lab, masked), the column's legend under it; line = mean over seeds, band = ± std;
    colours by method name. The y-axis starts just below the lowest band of the columns with a
    buffer (shared, so they compare) and of the column without one."""
    # Figures without pyplot: no global backend switch (notebooks keep theirs), no GUI needed.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    groups, protocols = _curve_panels(rows)
    n_seeds = max(len(mine) for _, mine in rows)
    legend_rows = max(sum(strategy_group(m[0]) == g for _, m in rows) for g in groups)
    legend_h = 0.18 * legend_rows + 0.1
    fig = Figure(
        figsize=(max(5.6, 3.6 * len(groups) + 0.6), 2.5 * len(protocols) + 0.8 + legend_h),
        layout="constrained",
    )
    grid = fig.add_gridspec(
        len(protocols) + 1, len(groups), height_ratios=[2.5] * len(protocols) + [legend_h]
    )
    n_exp, lows, columns = 1, {}, {}
    for col, group in enumerate(groups):
        axes = [fig.add_subplot(grid[row, col]) for row in range(len(protocols))]
        columns[group], low = axes, 1.0
        for ax, (key, _, ylabel) in zip(axes, protocols):
            for label, mine in rows:
                curves = [r[key] for r in mine if r.get(key)]
                if strategy_group(mine[0]) != group or len(curves) < len(mine):
                    continue  # another panel, or records older than this metric
                mean, std = _mean_curve(curves)
                x = list(range(1, len(mean) + 1))
                n_exp = max(n_exp, len(x))
                low = min(low, *(m - s for m, s in zip(mean, std)))
                style = method_style(mine[0]["strategy"])
                ax.plot(x, mean, ms=3.5, lw=1.4, label=label, **style)
                if len(curves) > 1:
                    lo = [m - s for m, s in zip(mean, std)]
                    hi = [m + s for m, s in zip(mean, std)]
                    ax.fill_between(x, lo, hi, color=style["color"], alpha=0.15, lw=0)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if col == 0:
                ax.set_ylabel(ylabel, fontsize=9)
        lows[group] = low
        axes[0].set_title(group, fontsize=10)
        axes[-1].set_xlabel("experiences trained", fontsize=9)
        legend = fig.add_subplot(grid[len(protocols), col])
        legend.axis("off")
        legend.legend(
            *axes[-1].get_legend_handles_labels(), loc="upper center", fontsize=7.5, frameon=False
        )
    # the columns with a buffer share their y-range (no buffer: its own, it falls much lower)
    shared = min((v for g, v in lows.items() if g != "no buffer"), default=1.0)
    for group, axes in columns.items():
        low = lows[group] if group == "no buffer" else shared
        for ax in axes:
            ax.set_ylim(max(0.0, math.floor((low - 0.02) * 10) / 10), 1.01)
            ax.set_xlim(0.8, n_exp + 0.2)
    spread = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    fig.suptitle(f"{title}: accuracy after each experience ({spread})", fontsize=10)
    return fig


def _summary_figure(rows: list[tuple[str, list[dict]]], title: str):
    """Final accuracy and forward transfer side by side: bar = mean over seeds (lab protocol
    where the records have it), dots = seeds, hollow diamond = masked protocol's mean."""
    from matplotlib.figure import Figure

    lab = any(_values(mine, "lab_final_accuracy") for _, mine in rows)
    fig = Figure(figsize=(9, 0.42 * max(len(rows), 4) + 1.4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    y = list(range(len(rows)))
    colours = [method_style(mine[0]["strategy"])["color"] for _, mine in rows]
    protocol = "lab protocol" if lab else "masked protocol"
    panels = [
        ("lab_final_accuracy" if lab else "final_accuracy", "final_accuracy", "final accuracy"),
        ("lab_forward_transfer" if lab else "forward_transfer", "forward_transfer", "FWT"),
    ]
    for ax, (key, masked_key, label) in zip(axes, panels):
        values = [_values(mine, key) for _, mine in rows]
        means = [mean_std(v)[0] if v else float("nan") for v in values]
        ax.barh(y, means, color=colours, alpha=0.45, edgecolor=colours, height=0.6)
        if lab:
            masked = [
                mean_std(v)[0] if (v := _values(mine, masked_key)) else float("nan")
                for _, mine in rows
            ]
            ax.scatter(masked, y, marker="D", facecolors="none", edgecolors="black", s=22, zorder=4)
        else:
            masked = []
        for i, vals in enumerate(values):
            ax.scatter(vals, [i] * len(vals), color=colours[i], edgecolors="black", s=14, zorder=3)
            if vals:
                text = f"{means[i]:+.3f}" if masked_key == "forward_transfer" else f"{means[i]:.3f}"
                ax.text(max(means[i], 0) + 0.01, i + 0.3, text, fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(f"{label} ({protocol})")
        ax.grid(axis="x", alpha=0.3)
        if masked_key == "forward_transfer":
            flat = [v for vals in values for v in vals] + [m for m in masked if math.isfinite(m)]
            flat = flat or [0.0]
            ax.set_xlim(min(-0.2, min(flat) - 0.05), max(0.3, max(flat) + 0.1))
    axes[0].set_xlim(0, 1.08)
    axes[0].set_yticks(y, [label for label, _ in rows], fontsize=8)
    axes[0].invert_yaxis()
    note = "; hollow diamonds = masked mean" if lab else ""
    fig.suptitle(f"{title}: bars = mean over seeds, dots = seeds{note}", fontsize=9)
    return fig


def _save_figure(fig, path: Path, fmt: str) -> None:
    """One format of ``fig``, written atomically; no dates in the file, so an unchanged figure
    gives an unchanged file."""
    from matplotlib import rc_context

    metadata = {"png": {}, "pdf": {"CreationDate": None}, "svg": {"Date": None}}[fmt]
    buffer = io.BytesIO()
    with rc_context({"svg.hashsalt": "avalanche-d2l", "svg.fonttype": "none"}):
        fig.savefig(buffer, format=fmt, dpi=150, metadata=metadata)
    atomic_write(path, buffer.getvalue())


def main(
    argv: Sequence[str] | None = None, *, prog: str = "python -m avalanche_d2l.experiments.report"
) -> int:
    """``avalanche-d2l report OUT...`` (or ``python -m avalanche_d2l.experiments.report``): redraw
    the report of each output folder from its ``results.json`` (no training)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Redraw results.md and the figures of an output folder from its results.json.",
    )
    parser.add_argument("out", nargs="+", type=Path, help="folders holding a results.json")
    parser.add_argument("--figures-only", action="store_true", help="leave results.md as it is")
    args = parser.parse_args(argv)
    for out in args.out:
        path = out / "results.json"
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(
                f"report: cannot read {path} ({err}); give a folder `compare` wrote",
                file=sys.stderr,
            )
            return 2
        write = write_figures if args.figures_only else write_report
        written = write(results, out)
        print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
