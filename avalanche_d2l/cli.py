"""Command line: ``avalanche-d2l compare ...`` and ``avalanche-d2l pretrain-dreamer ...``.

``compare`` runs registered strategies on one benchmark with the same model, optimiser and epochs,
for several seeds, and writes ``results.json`` (every run), ``results.md`` (mean ± std over seeds)
and ``accuracy.png`` (accuracy on the classes seen so far after each experience). Each run is
checkpointed after every experience with Avalanche's checkpointing, and finished runs are stored in
``results.json`` as soon as they end, so a killed comparison resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from avalanche_d2l.registry import RunConfig, build_strategy, get_strategy_factory, strategy_names
from avalanche_d2l.utils import seed_everything

__all__ = [
    "BENCHMARKS",
    "EpochBar",
    "PeakRSS",
    "atomic_write",
    "main",
    "run_compare",
    "summarise_run",
    "train_with_checkpoints",
    "write_report",
]


def _split_digits(seed: int):
    from avalanche_d2l.scenarios import split_digits

    return split_digits(n_experiences=5, image_size=16, channels=1, seed=seed)


def _split_color_digits(seed: int):
    from avalanche_d2l.scenarios import split_color_digits

    return split_color_digits(n_experiences=5, image_size=16, seed=seed)


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """How the command line builds a benchmark and its classifier."""

    build: Callable[[int], object]
    model: str
    feature_layer: str
    in_channels: int
    n_classes: int


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "split_digits": BenchmarkSpec(_split_digits, "small_cnn", "block3", 1, 10),
    "split_color_digits": BenchmarkSpec(_split_color_digits, "small_cnn", "block3", 3, 10),
}

DEFAULT_STRATEGIES = "naive,lwf,ewc,replay,der,er_ace,generative_replay,cumulative"
QUICK_EPOCHS = 2


def _make_model(spec: BenchmarkSpec) -> torch.nn.Module:
    from avalanche_d2l.models import resnet18_cifar, small_cnn

    if spec.model == "small_cnn":
        return small_cnn(spec.n_classes, spec.in_channels)
    if spec.model == "resnet18_cifar":
        return resnet18_cifar(spec.n_classes, spec.in_channels)
    raise ValueError(f"unknown model {spec.model!r}")


class PeakRSS:
    """Peak resident memory of this process while a run lasts (sampled in a thread)."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


class EpochBar:
    """Avalanche plugin: a tqdm bar over the training iterations of each experience."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc = desc
        self.enabled = enabled
        self._bar = None

    def before_training_exp(self, strategy, **kwargs):
        if self.enabled:
            total = strategy.train_epochs * len(strategy.dataloader)
            k = strategy.experience.current_experience
            self._bar = tqdm(total=total, desc=f"{self.desc} exp {k}", leave=False, unit="it")

    def after_training_iteration(self, strategy, **kwargs):
        if self._bar is not None:
            self._bar.update(1)

    def after_training_exp(self, strategy, **kwargs):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __getstate__(self):  # tqdm bars do not pickle; checkpoints happen between experiences
        return {"desc": self.desc, "enabled": self.enabled, "_bar": None}


def summarise_run(strategy, n_trained: int, accuracy_matrix, seen_accuracy) -> dict:
    """The per-run summary of ``results.json`` from a strategy's evaluator after training."""
    from avalanche_d2l.evaluation import AIA, FWT_STREAM, ForwardTransferAtStart

    last = strategy.evaluator.get_last_metrics()
    fwt = next(m for m in strategy.evaluator.metrics if isinstance(m, ForwardTransferAtStart))
    return {
        "final_accuracy": seen_accuracy[-1],
        "avg_incremental_accuracy": float(last[AIA]),
        "forgetting": float(last.get("StreamForgetting/eval_phase/test_stream", 0.0)),
        "bwt": float(last.get("StreamBWT/eval_phase/test_stream", 0.0)),
        "forward_transfer": float(last[FWT_STREAM]) if n_trained > 1 else 0.0,
        "accuracy_matrix": accuracy_matrix,
        "seen_accuracy": seen_accuracy,
        # per experience k: accuracy at the start of its training and minus the random-init one
        "accuracy_at_start": [fwt.accuracy_at_start[k] for k in sorted(fwt.accuracy_at_start)],
        "forward_transfer_per_experience": [fwt.transfer[k] for k in sorted(fwt.transfer)],
    }


def train_with_checkpoints(
    strategy,
    benchmark,
    *,
    seed: int,
    ckpt: Path,
    n_train: int | None = None,
    loader_kwargs: dict | None = None,
    save: Callable | None = None,
    after_load: Callable | None = None,
) -> dict:
    """Train ``strategy`` on the first ``n_train`` experiences, checkpointing after each one.

    An existing checkpoint at ``ckpt`` is resumed. After every experience the whole test stream
    is evaluated; the accuracy matrix, the seen-class accuracies and the wall time travel with the
    strategy in the checkpoint, so a resumed run reports the same as an uninterrupted one.

    Args:
        strategy: a freshly built strategy (replaced by the checkpointed one when there is one).
        benchmark: its benchmark.
        seed: experience k is trained with the global seed ``seed * 1000 + k``.
        ckpt: checkpoint file.
        n_train: experiences to train (default: the whole train stream).
        loader_kwargs: extra ``train``/``eval`` keyword arguments (e.g. ``num_workers``).
        save: ``save(strategy, path)`` (default :func:`avalanche_d2l.checkpointing.save_strategy`).
        after_load: called with the strategy restored from a checkpoint.

    Returns:
        :func:`summarise_run`'s dict plus ``wall_s``.
    """
    from avalanche_d2l.checkpointing import load_strategy, save_strategy
    from avalanche_d2l.evaluation import SEEN_ACC

    save = save or save_strategy
    loader_kwargs = loader_kwargs or {}
    strategy, start = load_strategy(strategy, ckpt, map_location=strategy.device)
    if start and after_load is not None:
        after_load(strategy)
    # Bookkeeping that must survive a resume travels with the strategy object in the checkpoint.
    book = getattr(strategy, "_compare_book", None) or {"acc": [], "seen": [], "wall_s": 0.0}
    n_train = len(benchmark.train_stream) if n_train is None else n_train
    n_test = len(benchmark.test_stream)
    for k in range(start, n_train):
        t0 = time.perf_counter()
        seed_everything(seed * 1000 + k)
        strategy.train(benchmark.train_stream[k], eval_streams=[], **loader_kwargs)
        results = strategy.eval(benchmark.test_stream, **loader_kwargs)
        book["wall_s"] += time.perf_counter() - t0
        book["acc"].append([
            float(results[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"])
            for j in range(n_test)
        ])
        book["seen"].append(float(results[SEEN_ACC]))
        strategy._compare_book = book
        save(strategy, ckpt)
    summary = summarise_run(strategy, n_train, book["acc"], book["seen"])
    summary["wall_s"] = book["wall_s"]
    return summary


def _train_one(name: str, seed: int, run: RunConfig, spec: BenchmarkSpec, ckpt: Path,
               progress: bool) -> dict:
    """Build ``name`` for the benchmark and one seed, and train it with checkpoints."""
    from avalanche_d2l.evaluation import make_evaluator

    seed_everything(seed)
    benchmark = spec.build(seed)
    model = _make_model(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=run.lr)
    evaluator = make_evaluator(benchmark, interactive=False, eval_mb_size=run.eval_mb_size)
    strategy = build_strategy(
        name, model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(),
        benchmark=benchmark, run=run, evaluator=evaluator, device=torch.device(run.device),
        plugins=[EpochBar(f"{name} s{seed}", enabled=progress)],
    )
    return train_with_checkpoints(strategy, benchmark, seed=seed, ckpt=ckpt)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


METRICS = [
    ("final_accuracy", "Final acc."),
    ("avg_incremental_accuracy", "Avg. incr. acc."),
    ("forgetting", "Forgetting"),
    ("bwt", "BWT"),
    ("forward_transfer", "FWT"),
    ("wall_s", "Wall s"),
]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value), as in the result tables."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def write_report(results: dict, out: Path) -> None:
    """Write ``results.md`` (mean ± std over seeds) and ``accuracy.png`` from ``results``."""
    # A Figure without pyplot: no global backend switch (notebooks keep theirs), no GUI needed.
    from matplotlib.figure import Figure

    runs = results["runs"]
    order = [s for s in results["config"]["strategies"] if any(r["strategy"] == s for r in runs)]
    lines = [
        f"Benchmark `{results['config']['benchmark']}`, seeds "
        f"{sorted({r['seed'] for r in runs})}, {results['config']['epochs']} epochs, "
        f"buffer {results['config']['mem_size']} (rehearsal methods). Mean ± std over seeds.",
        "",
        "| Strategy | " + " | ".join(label for _, label in METRICS) + " | Seeds |",
        "|---" * (len(METRICS) + 2) + "|",
    ]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name in order:
        mine = [r for r in runs if r["strategy"] == name]
        cells = []
        for key, _ in METRICS:
            m, s = mean_std([float(r[key]) for r in mine])
            cells.append(f"{m:.1f} ± {s:.1f}" if key == "wall_s" else f"{m:.3f} ± {s:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(mine)} |")
        curves = torch.tensor([r["seen_accuracy"] for r in mine])
        x = range(1, curves.shape[1] + 1)
        mean = curves.mean(0)
        ax.plot(x, mean, marker="o", label=name)
        if len(mine) > 1:
            std = curves.std(0)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    if runs:
        ax.set_xticks(range(1, len(runs[0]["seen_accuracy"]) + 1))
    ax.set_xlabel("experiences trained")
    ax.set_ylabel("accuracy on classes seen so far")
    ax.set_title(results["config"]["benchmark"])
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    atomic_write(out / "results.md", "\n".join(lines) + "\n")


def resume_runs(
    folder: Path,
    config: dict,
    names: Sequence[str],
    seeds: Sequence[int],
    run_one: Callable[[str, int, Path, Path], dict],
    *,
    check_settings: Callable[[dict, Path], None],
    progress: bool = True,
    desc: str = "compare",
) -> dict:
    """Run every (strategy, seed) not yet in ``folder/results.json``, writing it after each run.

    ``check_settings(previous_config, results_path)`` raises when the file was written with other
    settings. ``run_one(name, seed, ckpt, work_dir)`` returns the run's record (``ckpt`` is its
    checkpoint file, deleted once the run is recorded; ``work_dir`` its folder of files). Ends
    with :func:`write_report`. Returns ``{"config": config, "runs": [...]}``.
    """
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    results_path = folder / "results.json"
    results = {"config": config, "runs": []}
    if results_path.exists():
        previous = json.loads(results_path.read_text())
        check_settings(previous["config"], results_path)
        results["runs"] = previous["runs"]
    done = {(r["strategy"], r["seed"]) for r in results["runs"]}
    todo = [(s, seed) for seed in seeds for s in names if (s, seed) not in done]
    bar = tqdm(todo, desc=desc, unit="run", disable=not progress)
    for name, seed in bar:
        bar.set_postfix_str(f"{name} seed {seed}")
        ckpt = folder / "checkpoints" / f"{name}_seed{seed}.pkl"
        record = run_one(name, seed, ckpt, folder / "work" / f"{name}_seed{seed}")
        results["runs"].append(record)
        atomic_write(results_path, json.dumps(results, indent=1))
        ckpt.unlink(missing_ok=True)
    atomic_write(results_path, json.dumps(results, indent=1))
    write_report(results, folder)
    return results


def run_compare(
    benchmark: str = "split_digits",
    strategies: Sequence[str] | str = DEFAULT_STRATEGIES,
    seeds: Sequence[int] = (0, 1, 2),
    out: str | os.PathLike = "results",
    epochs: int | None = None,
    mem_size: int | None = None,
    quick: bool = False,
    device: str = "cpu",
    progress: bool = True,
    threads: int | None = 1,
) -> dict:
    """Run the comparison and write ``results.json``, ``results.md`` and ``accuracy.png``.

    Finished (strategy, seed) runs already in ``out/results.json`` are skipped; an interrupted run
    resumes from its last experience checkpoint in ``out/checkpoints/``.

    Args:
        benchmark: a name of :data:`BENCHMARKS`.
        strategies: registered strategy names (list or comma-separated string).
        seeds: one run per seed and strategy.
        out: output folder.
        epochs: training epochs per experience (default 10; 2 with ``quick``).
        mem_size: rehearsal buffer size (default 100).
        quick: small settings for smoke tests and CI.
        device: torch device.
        progress: show progress bars.
        threads: torch intra-op threads (``None`` keeps torch's default). The default models are
            tiny; one thread avoids OpenMP contention, which slows them down many times on a
            loaded machine.
    """
    if isinstance(strategies, str):
        strategies = [s.strip() for s in strategies.split(",") if s.strip()]
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; valid names: {', '.join(BENCHMARKS)}")
    unknown = [s for s in strategies if s not in strategy_names()]
    if unknown:
        raise ValueError(
            f"unknown strategy name(s) {', '.join(map(repr, unknown))}; valid names: "
            f"{', '.join(strategy_names())}"
        )
    for s in strategies:
        get_strategy_factory(s)  # import errors surface before any training
    if not seeds:
        raise ValueError("give at least one seed")
    spec = BENCHMARKS[benchmark]
    if threads is not None:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="Call to deprecated function update")
    run = RunConfig(
        benchmark=benchmark, model=spec.model, feature_layer=spec.feature_layer,
        epochs=epochs if epochs is not None else (QUICK_EPOCHS if quick else 10),
        mem_size=mem_size if mem_size is not None else 100, quick=quick, device=device,
        progress=progress,
    )
    config = {**dataclasses.asdict(run), "strategies": list(strategies), "seeds": list(seeds)}
    config.pop("seed")
    config.pop("work_dir")
    config.pop("progress")

    def check_settings(previous: dict, results_path: Path) -> None:
        old = {k: v for k, v in previous.items() if k not in ("strategies", "seeds")}
        new = {k: v for k, v in config.items() if k not in ("strategies", "seeds")}
        if old != new:
            raise ValueError(
                f"{results_path} was written with different settings ({old}); use another --out "
                f"or the same settings ({new})"
            )

    def run_one(name: str, seed: int, ckpt: Path, work_dir: Path) -> dict:
        with PeakRSS() as rss:
            summary = _train_one(name, seed,
                                 dataclasses.replace(run, seed=seed, work_dir=str(work_dir)),
                                 spec, ckpt, progress)
        return {"strategy": name, "seed": seed, **summary, "peak_rss_mb": rss.peak / 2**20}

    return resume_runs(Path(out), config, strategies, seeds, run_one,
                       check_settings=check_settings, progress=progress)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avalanche-d2l", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmp_ = sub.add_parser("compare", help="compare strategies on a benchmark")
    cmp_.add_argument("--benchmark", default="split_digits",
                      help=f"one of: {', '.join(BENCHMARKS)}")
    cmp_.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                      help="comma-separated strategy names; valid: " + ", ".join(strategy_names()))
    cmp_.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    cmp_.add_argument("--out", default="results", help="output folder (resumes if it exists)")
    cmp_.add_argument("--epochs", type=int, default=None)
    cmp_.add_argument("--mem-size", type=int, default=None)
    cmp_.add_argument("--quick", action="store_true", help="small settings for smoke tests")
    cmp_.add_argument("--device", default="cpu")
    cmp_.add_argument("--no-progress", action="store_true")
    cmp_.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads (default 1: the default models are tiny)")
    sub.add_parser("pretrain-dreamer", add_help=False,
                   help="pretrain the offline glyph dreamer used by D2L on CPU")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pretrain-dreamer"]:
        from avalanche_d2l.dreaming.pretrain import main as pretrain_main

        return pretrain_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        results = run_compare(
            benchmark=args.benchmark, strategies=args.strategies, seeds=args.seeds,
            out=args.out, epochs=args.epochs, mem_size=args.mem_size, quick=args.quick,
            device=args.device, progress=not args.no_progress, threads=args.threads,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"avalanche-d2l: error: {err}", file=sys.stderr)
        return 2
    print((Path(args.out) / "results.md").read_text())
    print(f"wrote {args.out}/results.json, results.md, accuracy.png "
          f"({len(results['runs'])} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
