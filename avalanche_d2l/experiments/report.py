"""Reports of an experiment: ``results.md`` (mean ± std over seeds), ``accuracy.png`` (accuracy
after each experience) and ``summary.png`` (final accuracy and forward transfer per strategy, one
dot per seed).

The tables headline the lab's protocol (``papers/d2l.md`` A2, B; :mod:`avalanche_d2l.evaluation`):
argmax over all output units, heads that host only a dream counted as errors, final accuracy the
mean of the per-experience accuracies. The masked figures (the model's class-space output, final
accuracy over all test samples of the seen classes) stand beside them.
"""

from __future__ import annotations

import io
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "METRICS",
    "PROTOCOL_NOTE",
    "atomic_write",
    "mean_std",
    "row_label",
    "summarise_run",
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


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``path`` through a temporary file in the same folder and a rename (the folder is
    created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)


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
    vals = _values(runs, key)
    if not vals:
        return "n/a"
    m, s = mean_std(vals)
    text = f"{m:.1f} ± {s:.1f}" if key == "wall_s" else f"{m:.3f} ± {s:.3f}"
    return text if len(vals) == len(runs) else f"{text} ({len(vals)} of {len(runs)})"


def _mean_curve(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    """Mean and std (0 for one curve) over curves, cut to the shortest."""
    n = min(len(c) for c in curves)
    mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
    std = [statistics.stdev(c[i] for c in curves) if len(curves) > 1 else 0.0 for i in range(n)]
    return mean, std


def write_report(results: dict, out: Path) -> None:
    """Write ``results.md``, ``accuracy.png`` and ``summary.png`` from ``results``."""
    out = Path(out)
    exp = results["experiment"]
    rows = _rows(results)
    seeds = sorted({r["seed"] for r in results["runs"]})
    training = exp["training"]
    first, later = training["first_experience"], training["optimizer"]
    epochs = later["epochs"] if first is None else f"{first['epochs']} (first) / {later['epochs']}"
    lines = [
        f"Benchmark `{exp['benchmark']['name']}`, model `{exp['model']['name']}`, seeds {seeds}, "
        f"{epochs} epochs. Mean ± std over seeds.",
        "",
        "| Strategy | " + " | ".join(label for _, label in METRICS) + " | Seeds |",
        "|---" * (len(METRICS) + 2) + "|",
    ]
    for label, mine in rows:
        cells = [_cell(mine, key) for key, _ in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(mine)} |")
    lines += ["", PROTOCOL_NOTE]
    title = exp["benchmark"]["name"]
    _save_figure(_accuracy_figure(rows, title), out / "accuracy.png")
    _save_figure(_summary_figure(rows, title), out / "summary.png")
    atomic_write(out / "results.md", "\n".join(lines) + "\n")


def _accuracy_figure(rows: list[tuple[str, list[dict]]], title: str):
    """Accuracy after each trained experience: lab (solid; mean over the trained experiences)
    and masked (dashed; on the seen classes' samples), mean over seeds, band = std."""
    # Figures without pyplot: no global backend switch (notebooks keep theirs), no GUI needed.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for i, (label, mine) in enumerate(rows):
        colour = f"C{i % 10}"
        for key, style, name in (
            ("lab_avg_accuracy", "-", f"{label} (lab)"),
            ("seen_accuracy", "--", f"{label} (masked)"),
        ):
            curves = [r[key] for r in mine if r.get(key)]
            if len(curves) < len(mine):
                continue  # records older than the lab metrics: no lab curve
            mean, std = _mean_curve(curves)
            x = list(range(1, len(mean) + 1))
            ax.plot(x, mean, style, marker="o", ms=3, color=colour, label=name)
            if len(curves) > 1:
                lo = [m - s for m, s in zip(mean, std)]
                ax.fill_between(x, lo, [m + s for m, s in zip(mean, std)], color=colour, alpha=0.12)
    ax.set_xlabel("experiences trained")
    ax.set_ylabel("accuracy (lab: mean over trained experiences)")
    ax.set_title(title)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def _summary_figure(rows: list[tuple[str, list[dict]]], title: str):
    """Final accuracy and forward transfer under the lab protocol side by side: bar = mean,
    dots = seeds; the masked protocol's mean is a hollow diamond."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 0.42 * max(len(rows), 4) + 1.4))
    axes = fig.subplots(1, 2, sharey=True)
    y = list(range(len(rows)))
    panels = [
        ("lab_final_accuracy", "final_accuracy", "final accuracy (lab protocol)"),
        ("lab_forward_transfer", "forward_transfer", "forward transfer (lab protocol)"),
    ]
    for ax, (key, masked_key, label) in zip(axes, panels):
        values = [_values(mine, key) for _, mine in rows]
        means = [mean_std(v)[0] if v else float("nan") for v in values]
        masked = [mean_std(_values(mine, masked_key))[0] for _, mine in rows]
        ax.barh(y, means, color="#9ecae1", edgecolor="#3182bd", height=0.6)
        ax.scatter(masked, y, marker="D", facecolors="none", edgecolors="#d94801", s=22, zorder=4)
        for i, vals in enumerate(values):
            ax.scatter(vals, [i] * len(vals), color="#08306b", s=14, zorder=3)
            if vals:
                text = f"{means[i]:+.3f}" if masked_key == "forward_transfer" else f"{means[i]:.3f}"
                ax.text(max(means[i], 0) + 0.01, i + 0.3, text, fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
        if masked_key == "forward_transfer":
            flat = [v for vals in values for v in vals] + masked
            ax.set_xlim(min(-0.2, min(flat) - 0.05), max(0.3, max(flat) + 0.1))
    axes[0].set_xlim(0, 1.08)
    axes[0].set_yticks(y, [label for label, _ in rows], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(
        f"{title}: bars = mean over seeds, dots = seeds (lab); hollow diamonds = masked mean",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def _save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write(path, buffer.getvalue())
