"""The experiment engine: one schema for every method, shared builders, the optimiser schedule,
the resumable runner and the report. ``avalanche-d2l run``, ``avalanche-d2l compare``, the notebooks
and the scripts in ``benchmarks/`` all go through it.

* :func:`load_experiment` -- a shipped experiment by name (``list_experiments()``) or a file.
* :func:`default_experiment` -- what ``compare --benchmark NAME`` runs.
* :func:`run_experiment` -- run (or resume) an experiment into a folder.
* :func:`build_run` -- the benchmark and strategy of one run, e.g. for a notebook.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from avalanche_d2l.experiments.builders import (
    BENCHMARKS,
    build_benchmark,
    build_model,
    check_class_incremental,
)
from avalanche_d2l.experiments.dry_run import dry_run
from avalanche_d2l.experiments.report import mean_std, write_report
from avalanche_d2l.experiments.runner import (
    RunKey,
    RunOptions,
    build_run,
    run_experiment,
    train_with_checkpoints,
)
from avalanche_d2l.experiments.schedule import OptimSchedule
from avalanche_d2l.experiments.schema import (
    ALIASES,
    Experiment,
    ModelSpec,
    OptimSpec,
    TrainingSpec,
    apply_overrides,
    parse_assignment,
)

__all__ = [
    "ALIASES",
    "BENCHMARKS",
    "Experiment",
    "ModelSpec",
    "OptimSchedule",
    "OptimSpec",
    "RunKey",
    "RunOptions",
    "TrainingSpec",
    "apply_overrides",
    "build_benchmark",
    "build_model",
    "build_run",
    "check_class_incremental",
    "default_experiment",
    "dry_run",
    "experiment_files",
    "list_experiments",
    "load_experiment",
    "mean_std",
    "parse_assignment",
    "run_experiment",
    "train_with_checkpoints",
    "write_report",
]


def experiment_files() -> dict[str, Path]:
    """The shipped experiment files (package data), by name."""
    folder = resources.files("avalanche_d2l.experiments") / "files"
    return {
        Path(str(p)).stem: Path(str(p))
        for p in sorted(folder.iterdir(), key=str)
        if str(p).endswith(".json")
    }


def list_experiments() -> list[tuple[str, str]]:
    """``(name, description)`` of every shipped experiment."""
    return [(name, load_experiment(name).description) for name in experiment_files()]


def load_experiment(
    name_or_path: str | Path, overrides: Sequence[tuple[str, Any]] = ()
) -> Experiment:
    """A shipped experiment by name, or an experiment file by path, with ``overrides``
    (``[("training.optimizer.lr", 0.01)]``, :func:`apply_overrides`) set before it is checked.

    Raises:
        ValueError: neither a shipped name nor an existing file (the message lists the names),
            a file that does not follow the schema, or an override the schema refuses.
    """
    files = experiment_files()
    if str(name_or_path) in files:
        return Experiment.from_file(files[str(name_or_path)], overrides)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return Experiment.from_file(path, overrides)
    raise ValueError(
        f"{str(name_or_path)!r} is neither a shipped experiment nor a file; shipped: "
        f"{', '.join(files)} (avalanche-d2l run --list)"
    )


def default_experiment(
    benchmark: str, overrides: Sequence[tuple[str, Any]] = (), *, title: str = ""
) -> Experiment:
    """What ``compare --benchmark NAME`` runs: the shipped experiment of that name when there is
    one (the offline streams), else the benchmark with its default classifier, Adam (lr 1e-3),
    10 epochs, batch 32, buffer 100 and every strategy at its defaults; ``overrides`` as in
    :func:`load_experiment`; ``title`` names the report (default: the benchmark's name)."""
    if benchmark in experiment_files():
        exp = load_experiment(benchmark, overrides)
    elif benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; valid names: {', '.join(BENCHMARKS)}")
    else:
        info = BENCHMARKS[benchmark]
        data = {
            "description": f"{benchmark} with the default settings of compare",
            "benchmark": {"name": benchmark},
            "model": {"name": info.model, "feature_layer": info.feature_layer},
            "training": {
                "optimizer": {"name": "adam", "lr": 1e-3, "epochs": 10},
                "train_mb_size": 32,
                "eval_mb_size": 256,
            },
            "strategies": {"naive": {}},
            "mem_sizes": [100],
            "seeds": [0, 1, 2],
        }
        exp = Experiment.from_dict(apply_overrides(data, overrides), name=benchmark)
    if title and not exp.title:
        exp.title = title
    return exp
