"""Reports of an experiment: ``results.md`` (mean ± std over seeds), ``accuracy.png`` (accuracy on
the classes seen so far after each experience) and ``summary.png`` (final accuracy and forward
transfer per strategy, one dot per seed)."""

from __future__ import annotations

import io
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

__all__ = ["METRICS", "atomic_write", "mean_std", "row_label", "summarise_run", "write_report"]

METRICS = [
    ("final_accuracy", "Final acc."),
    ("avg_incremental_accuracy", "Avg. incr. acc."),
    ("forgetting", "Forgetting"),
    ("bwt", "BWT"),
    ("forward_transfer", "FWT"),
    ("wall_s", "Wall s"),
]


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


def summarise_run(strategy, n_trained: int, accuracy_matrix, seen_accuracy) -> dict:
    """The per-run metrics of ``results.json`` from a strategy's evaluator after training."""
    from avalanche_d2l.evaluation import AIA, FWT_STREAM, ForwardTransferAtStart

    last = strategy.evaluator.get_last_metrics()
    fwt = next(m for m in strategy.evaluator.metrics if isinstance(m, ForwardTransferAtStart))
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


def write_report(results: dict, out: Path) -> None:
    """Write ``results.md``, ``accuracy.png`` and ``summary.png`` from ``results``."""
    # Figures without pyplot: no global backend switch (notebooks keep theirs), no GUI needed.
    from matplotlib.figure import Figure

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
    acc_fig = Figure(figsize=(6.4, 4.2))
    ax = acc_fig.add_subplot()
    for label, mine in rows:
        cells = []
        for key, _ in METRICS:
            m, s = mean_std([float(r[key]) for r in mine])
            cells.append(f"{m:.1f} ± {s:.1f}" if key == "wall_s" else f"{m:.3f} ± {s:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(mine)} |")
        curves = [r["seen_accuracy"] for r in mine]
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
        x = list(range(1, n + 1))
        ax.plot(x, mean, marker="o", label=label)
        if len(mine) > 1:
            std = [statistics.stdev(c[i] for c in curves) for i in range(n)]
            ax.fill_between(
                x,
                [m - s for m, s in zip(mean, std)],
                [m + s for m, s in zip(mean, std)],
                alpha=0.15,
            )
    ax.set_xlabel("experiences trained")
    ax.set_ylabel("accuracy on classes seen so far")
    ax.set_title(exp["benchmark"]["name"])
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    acc_fig.tight_layout()
    _save_figure(acc_fig, out / "accuracy.png")
    _save_figure(_summary_figure(rows, exp["benchmark"]["name"]), out / "summary.png")
    atomic_write(out / "results.md", "\n".join(lines) + "\n")


def _summary_figure(rows: list[tuple[str, list[dict]]], title: str):
    """Final accuracy and forward transfer side by side: bar = mean, dots = seeds."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 0.42 * max(len(rows), 4) + 1.4))
    axes = fig.subplots(1, 2, sharey=True)
    y = list(range(len(rows)))
    panels = [
        ("final_accuracy", "final accuracy (all classes)"),
        ("forward_transfer", "forward transfer (FWT)"),
    ]
    for ax, (key, label) in zip(axes, panels):
        values = [[float(r[key]) for r in mine] for _, mine in rows]
        means = [mean_std(v)[0] for v in values]
        ax.barh(y, means, color="#9ecae1", edgecolor="#3182bd", height=0.6)
        for i, vals in enumerate(values):
            ax.scatter(vals, [i] * len(vals), color="#08306b", s=14, zorder=3)
            text = f"{means[i]:+.3f}" if key == "forward_transfer" else f"{means[i]:.3f}"
            ax.text(max(means[i], 0) + 0.01, i + 0.3, text, fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
        if key == "forward_transfer":
            flat = [v for vals in values for v in vals]
            ax.set_xlim(min(-0.2, min(flat) - 0.05), max(0.3, max(flat) + 0.1))
    axes[0].set_xlim(0, 1.08)
    axes[0].set_yticks(y, [label for label, _ in rows], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"{title}: bars = mean over seeds, dots = seeds", fontsize=9)
    fig.tight_layout()
    return fig


def _save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write(path, buffer.getvalue())
