"""The resumable runner of an experiment: one run per (strategy, seed, buffer size).

Layout of an output folder::

    OUT/results.json      {"experiment": <resolved experiment>, "runs": [one record per run]}
    OUT/results.json.bak  the previous version of results.json
    OUT/results.md, accuracy.png, summary.png
    OUT/runs/<run>.json   every finished run, written as soon as it ends (the durable store)
    OUT/checkpoints/      per-experience checkpoints of unfinished runs (Avalanche checkpointing)
    OUT/work/<run>/       files of a run (D2L's dream cache)

Every run records the *resolved* settings that made it (experiment, the strategy's typed config,
buffer size, package version) and their fingerprint. Running again into the same folder skips
finished runs whose settings are unchanged, re-runs (and says so) those whose settings changed, and
resumes an interrupted run from its last finished experience: a killed run resumes to the same
numbers, since experience k of seed s always trains with the global seed ``s * 1000 + k``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from avalanche_d2l.checkpointing import remove_checkpoint
from avalanche_d2l.core.storage import atomic_write, set_aside
from avalanche_d2l.distributed import add_data_parallel, check_processes
from avalanche_d2l.dreaming.accel import is_main_process, num_processes, wait_for_everyone
from avalanche_d2l.experiments.builders import (
    RunLogs,
    build_benchmark,
    build_model,
    check_class_incremental,
)
from avalanche_d2l.experiments.guards import FiniteLossGuard
from avalanche_d2l.experiments.lock import holds_output_lock
from avalanche_d2l.experiments.report import summarise_run, write_report
from avalanche_d2l.experiments.schedule import OptimSchedule
from avalanche_d2l.experiments.schema import Experiment, check_mem_sizes, check_seeds, resolve_name
from avalanche_d2l.registry import (
    RunConfig,
    benchmark_image_shape,
    config_to_dict,
    ensure_registered,
    get_strategy,
)
from avalanche_d2l.utils import quiet_replay_deprecation, seed_everything

__all__ = [
    "EpochBar",
    "PeakRSS",
    "RunKey",
    "RunOptions",
    "build_run",
    "check_device",
    "check_out_dir",
    "run_experiment",
    "train_with_checkpoints",
]

QUICK_EPOCHS = 2


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

    supports_distributed = True

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


# ------------------------------------------------------------------------------------------------
# input checks (all before any work)


def check_device(device: str) -> str:
    """``device`` as a usable torch device string, or a clear error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(
            f"device {device!r} is not a torch device; use cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} was asked for but torch sees no CUDA GPU here; "
                "use --device cpu (or install a CUDA build of torch)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type not in ("cpu", "mps"):
        raise ValueError(f"device {device!r} is not supported; use cpu or cuda[:N]")
    return str(dev)


def check_out_dir(out: Path) -> Path:
    """Create ``out`` and check that files can be written there."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"--out {out}: cannot write there ({err.strerror or err}); pass a writable folder"
        ) from err
    return out


def check_data(benchmark) -> list[str]:
    """Decode every image of every experience once; returns the problems found (one line each)."""
    problems: list[str] = []
    streams = [("train", benchmark.train_stream), ("test", benchmark.test_stream)]
    total = sum(len(e.dataset) for _, s in streams for e in s)
    with tqdm(total=total, desc="check data", unit="img") as bar:
        for sname, stream in streams:
            for exp in stream:
                for i in range(len(exp.dataset)):
                    try:
                        exp.dataset[i]
                    except Exception as err:  # noqa: BLE001 -- every unreadable file is listed
                        problems.append(
                            f"{sname} experience {exp.current_experience} item {i}: {err}"
                        )
                    bar.update(1)
    return problems


# ------------------------------------------------------------------------------------------------
# one run


@dataclass(frozen=True)
class RunKey:
    """One run of an experiment: strategy, seed, buffer size (``None``: keeps no buffer)."""

    strategy: str
    seed: int
    mem_size: int | None

    @property
    def name(self) -> str:
        mem = "" if self.mem_size is None else f"_mem{self.mem_size}"
        return f"{self.strategy}_seed{self.seed}{mem}"


@dataclass(frozen=True)
class RunOptions:
    """How runs execute (none of it changes results, except ``quick`` and ``max_experiences``,
    which are part of the recorded settings)."""

    data_root: str | None = None
    quick: bool = False
    max_experiences: int | None = None
    progress: bool = True
    num_workers: int = 0
    threads: int | None = 1
    logs: RunLogs | None = None  # TensorBoard / CSV / W&B / text logs, one per run


def run_settings(exp: Experiment, key: RunKey, opts: RunOptions) -> dict[str, Any]:
    """Everything that determines a run's result, as recorded in ``results.json``."""
    from avalanche_d2l import __version__

    return json.loads(
        json.dumps(
            {
                "experiment": exp.common_settings(),
                "strategy": key.strategy,
                "config": config_to_dict(exp.method_config(key.strategy)),
                "mem_size": key.mem_size,
                "seed": key.seed,
                "quick": opts.quick,
                "max_experiences": opts.max_experiences,
                "package_version": __version__,
            }
        )
    )


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def build_run(
    exp: Experiment,
    key: RunKey,
    opts: RunOptions,
    *,
    benchmark=None,
    work_dir: Path | None = None,
    extra_plugins: Sequence = (),
):
    """The benchmark and the freshly built strategy of one run (seeded by ``key.seed``).

    This is the one place where benchmark, model, optimiser, schedule, evaluator and strategy of
    a run are put together; ``compare``, ``run``, the notebooks and the benchmark scripts use it.
    """
    from avalanche_d2l.evaluation import make_evaluator

    seed_everything(key.seed)
    if benchmark is None:
        benchmark = build_benchmark(exp.benchmark, opts.data_root, key.seed)
    shape = benchmark_image_shape(benchmark)
    model, layer = build_model(
        exp.model.name, exp.model.feature_layer, int(benchmark.n_classes), shape, exp.model.width
    )
    training = exp.training
    if opts.quick and exp.training.optimizer.epochs > QUICK_EPOCHS:
        training = training.with_epochs(QUICK_EPOCHS)
    optimizer = training.first.build(model.parameters())
    main = is_main_process()  # Avalanche refuses loggers in the other processes of a run
    logs = ((opts.logs if main else None) or RunLogs()).evaluator_kwargs(
        key.name, run_settings(exp, key, opts)
    )
    evaluator = make_evaluator(
        benchmark, interactive=False, eval_mb_size=training.eval_mb_size, **logs
    )
    run = RunConfig(
        benchmark=exp.benchmark["name"],
        feature_layer=layer,
        epochs=training.first.epochs,
        train_mb_size=training.train_mb_size,
        eval_mb_size=training.eval_mb_size,
        mem_size=key.mem_size or 0,
        seed=key.seed,
        quick=opts.quick,
        device=exp.device,
        work_dir=None if work_dir is None else str(work_dir),
        progress=opts.progress,
        precision=exp.precision,
        dreamer_device=exp.dreamer_device,
    )
    plugins = [
        OptimSchedule(
            first=training.first,
            later=training.optimizer,
            fresh_each_experience=training.fresh_optimizer_each_experience,
        ),
        EpochBar(f"{key.strategy} s{key.seed}", enabled=opts.progress and main),
        FiniteLossGuard(),
        *extra_plugins,
    ]
    info = get_strategy(key.strategy)
    strategy = info.factory(
        model=model,
        optimizer=optimizer,
        criterion=torch.nn.CrossEntropyLoss(),
        benchmark=benchmark,
        run=run,
        config=exp.method_config(key.strategy),
        evaluator=evaluator,
        device=torch.device(exp.device),
        plugins=plugins,
    )
    add_data_parallel(strategy)  # several processes: one learner (first plugin)
    return benchmark, strategy


def train_with_checkpoints(
    strategy,
    benchmark,
    *,
    seed: int,
    ckpt: Path,
    n_train: int | None = None,
    loader_kwargs: dict | None = None,
) -> dict:
    """Train ``strategy`` on the first ``n_train`` experiences, checkpointing after each one.

    An existing checkpoint at ``ckpt`` is resumed; one that cannot be read is reported with its
    path, moved aside (``.corrupt``) and the run restarts from scratch. After every experience the
    whole test stream is evaluated; the accuracy matrix, the seen-class accuracies and the wall
    time travel with the strategy in the checkpoint, so a resumed run reports the same as an
    uninterrupted one.

    Returns:
        :func:`summarise_run`'s dict plus ``wall_s``.
    """
    from avalanche_d2l.checkpointing import load_strategy, save_strategy
    from avalanche_d2l.evaluation import LAB_ACC_EXP, LAB_AVG_ACC, SEEN_ACC

    loader_kwargs = loader_kwargs or {}
    try:
        strategy, start = load_strategy(strategy, ckpt, map_location=strategy.device)
    except Exception as err:  # noqa: BLE001 -- any unreadable checkpoint is set aside
        aside = set_aside(ckpt)
        warnings.warn(
            f"checkpoint {ckpt} could not be read ({type(err).__name__}: {err}); "
            f"moved it to {aside} and restarting this run from scratch",
            stacklevel=2,
        )
        start = 0
    add_data_parallel(strategy)  # a checkpoint of a one-process run has none
    book = getattr(strategy, "_compare_book", None) or {"acc": [], "seen": [], "wall_s": 0.0}
    n_train = len(benchmark.train_stream) if n_train is None else n_train
    n_test = len(benchmark.test_stream)
    for k in range(start, n_train):
        t0 = time.perf_counter()
        seed_everything(seed * 1000 + k)
        strategy.train(benchmark.train_stream[k], eval_streams=[], **loader_kwargs)
        results = strategy.eval(benchmark.test_stream, **loader_kwargs)
        book["wall_s"] += time.perf_counter() - t0
        book["acc"].append(
            [
                float(results[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"])
                for j in range(n_test)
            ]
        )
        book["seen"].append(float(results[SEEN_ACC]))
        # the lab's protocol (argmax over all output units, mean over trained experiences)
        book.setdefault("lab_acc", []).append(
            [float(results[LAB_ACC_EXP.format(j)]) for j in range(n_test)]
        )
        book.setdefault("lab_avg", []).append(float(results[LAB_AVG_ACC]))
        strategy._compare_book = book
        if is_main_process():
            save_strategy(strategy, ckpt)
        wait_for_everyone()
    summary = summarise_run(
        strategy,
        n_train,
        book["acc"],
        book["seen"],
        lab=(book.get("lab_acc", []), book.get("lab_avg", [])),
    )
    summary["wall_s"] = book["wall_s"]
    for plugin in strategy.plugins:  # a method's own per-run figures (Genifer: replay fidelity)
        if hasattr(plugin, "run_results"):
            summary.update(plugin.run_results())
    return summary


def _execute(exp: Experiment, key: RunKey, opts: RunOptions, out: Path) -> dict:
    """Train one run (resuming its checkpoint) and return its record."""
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    cuda = torch.device(exp.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss, quiet_replay_deprecation():
        benchmark, strategy = build_run(exp, key, opts, work_dir=out / "work" / key.name)
        n_train = len(benchmark.train_stream)
        if opts.max_experiences is not None:
            n_train = min(n_train, opts.max_experiences)
        summary = train_with_checkpoints(
            strategy,
            benchmark,
            seed=key.seed,
            ckpt=out / "checkpoints" / f"{key.name}.pkl",
            n_train=n_train,
            loader_kwargs={"num_workers": opts.num_workers} if opts.num_workers else None,
        )
    record = {
        "strategy": key.strategy,
        "seed": key.seed,
        "mem_size": key.mem_size,
        **summary,
        "peak_rss_mb": rss.peak / 2**20,
    }
    if cuda:
        record["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return record


def _worker(payload: tuple) -> dict:
    exp, key, opts, out, infos = payload
    ensure_registered(infos)
    return _execute(exp, key, opts, Path(out))


def _worker_init() -> None:
    """Pool workers ignore the terminal's Ctrl-C (the parent stops them) and die with the parent,
    even when it is killed with SIGKILL (Linux: the parent-death signal)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a comparison; the message says what finished and how to resume."""


def _interrupted(done: Sequence[str], stopped: Sequence[str], queued: int) -> RunInterrupted:
    parts = [f"interrupted: {len(done)} run(s) finished ({', '.join(done) or 'none'})"]
    if stopped:
        parts.append(f"{', '.join(stopped)} stopped from its last checkpoint")
    if queued:
        parts.append(f"{queued} not started")
    return RunInterrupted("; ".join(parts) + "; run the same command to resume")


def _picklable_infos(names: Sequence[str]) -> list:
    """The registry entries of ``names``, checked to reach a spawned worker process."""
    infos = [get_strategy(n) for n in names]
    for info in infos:
        try:
            pickle.dumps(info)
        except Exception as err:
            raise ValueError(
                f"strategy {info.name!r} cannot be sent to a worker process ({err}): register a "
                "factory defined at module level (not a lambda or a nested function), or run "
                "with jobs=1"
            ) from err
    return infos


# ------------------------------------------------------------------------------------------------
# the whole experiment


def _read_results(path: Path) -> dict | None:
    """The previous ``results.json``; an unreadable one is an error naming it and its backup."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "runs" not in data:
            raise ValueError("no 'runs' entry")
        return data
    except (ValueError, OSError) as err:
        bak = path.with_name(path.name + ".bak")
        raise ValueError(
            f"{path} cannot be read ({err}). Every finished run is also in {path.parent / 'runs'}"
            f"/ and the previous version is {bak}{'' if bak.exists() else ' (absent)'}: move "
            f"{path.name} away and run again to rebuild it from runs/"
        ) from err


def _write_results(path: Path, results: dict) -> None:
    """Atomically replace ``results.json``, keeping the previous version as ``.bak``."""
    if path.exists():
        shutil.copyfile(path, path.with_name(path.name + ".bak"))
    atomic_write(path, json.dumps(results, indent=1))


def _load_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as err:
        aside = set_aside(path)
        warnings.warn(
            f"run record {path} could not be read ({err}); moved to {aside}, the run is done again",
            stacklevel=2,
        )
        return None


def plan_runs(
    exp: Experiment, strategies: Sequence[str], seeds: Sequence[int], mem_sizes: Sequence[int]
) -> list[RunKey]:
    """The runs, in report order: seeds outermost, then strategies, then buffer sizes; a
    strategy that keeps no buffer runs once per seed."""
    keys: list[RunKey] = []
    for seed in seeds:
        for name in strategies:
            mems: list[int | None] = list(mem_sizes) if exp.keeps_buffer(name) else [None]
            keys += [RunKey(name, seed, m) for m in mems]
    return keys


@holds_output_lock
def run_experiment(
    exp: Experiment,
    *,
    out: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    strategies: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    mem_sizes: Sequence[int] | None = None,
    epochs: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    dreamer_device: str | None = None,
    dreamer: str | None = None,
    quick: bool = False,
    max_experiences: int | None = None,
    progress: bool = True,
    threads: int | None = 1,
    jobs: int = 1,
    num_workers: int = 0,
    check_images: bool = False,
    logs: RunLogs | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run ``exp`` into ``out`` (resumable) and write ``results.json``, ``results.md``,
    ``accuracy.png`` and ``summary.png``.

    Every argument left ``None`` keeps the experiment's value. All inputs are checked before any
    training.

    Args:
        exp: the experiment.
        out: output folder (created; resumed when it holds earlier runs).
        data_root: the dataset's folder for benchmarks that read local files.
        strategies: a subset / other strategies (names or aliases; each needs a section in the
            experiment or runs with its defaults).
        seeds, mem_sizes, epochs, device, precision, dreamer_device: overrides.
        dreamer: a dreamer (hub id or local folder) for every strategy that has one (D2L).
        quick: tiny settings for smoke tests (2 epochs unless ``epochs``; methods shrink too).
        max_experiences: train only the first K experiences.
        progress: progress bars.
        threads: torch CPU threads per run (``None``: torch's default).
        jobs: runs executed at once, each in its own process.
        num_workers: ``DataLoader`` workers (image decoding).
        check_images: decode every image once before training and stop on unreadable ones.
        logs: TensorBoard / CSV / W&B / text logs of every run (a sub-folder per run).
        log: where messages about skipped / re-run runs go.

    Returns:
        ``{"experiment": ..., "runs": [...]}`` as written to ``results.json``.
    """
    # ---- 1. check every input --------------------------------------------------------------
    full = exp  # every strategy section of the file (finished runs of others stay in the report)
    if strategies is not None:
        names = [resolve_name(s) for s in strategies]
        if not names:
            raise ValueError("no strategy given: pass at least one name")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(
                f"strategy {dup} given twice (names and aliases count once); list each once"
            )
        exp = dataclasses.replace(exp, strategies={n: exp.strategies.get(n, {}) for n in names})
    else:
        names = list(exp.strategies)
    if dreamer is not None:
        exp = with_dreamer(exp, dreamer, names)
    if epochs is not None:
        if int(epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        exp = dataclasses.replace(exp, training=exp.training.with_epochs(int(epochs)))
    elif quick and exp.training.optimizer.epochs > QUICK_EPOCHS:
        exp = dataclasses.replace(exp, training=exp.training.with_epochs(QUICK_EPOCHS))
    overrides = {
        k: v
        for k, v in (
            ("device", device),
            ("precision", precision),
            ("dreamer_device", dreamer_device),
        )
        if v is not None
    }
    seeds = check_seeds(exp.seeds if seeds is None else seeds)
    mem_sizes = check_mem_sizes(exp.mem_sizes if mem_sizes is None else mem_sizes)
    exp = dataclasses.replace(exp, seeds=seeds, mem_sizes=mem_sizes, **overrides)
    exp = dataclasses.replace(exp, device=check_device(exp.device))
    if exp.dreamer_device is not None:
        exp = dataclasses.replace(exp, dreamer_device=check_device(exp.dreamer_device))
    world = check_processes(exp.device)
    if exp.training.train_mb_size % world:  # before any run, not at the first experience
        raise ValueError(
            f"the training batch size {exp.training.train_mb_size} does not split over {world} "
            f"processes: use a multiple of {world} (each process trains on its share)"
        )
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if int(jobs) < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if jobs > 1 and num_processes() > 1:
        raise ValueError(
            "--jobs runs independent processes; under accelerate launch the "
            "processes already share each run: leave --jobs at 1"
        )
    if max_experiences is not None and int(max_experiences) < 1:
        raise ValueError(f"max_experiences must be >= 1, got {max_experiences}")
    if int(num_workers) < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if int(num_workers) > 0 and int(jobs) > 1:
        raise ValueError(
            f"--num-workers {num_workers} with --jobs {jobs}: each of the jobs would start its own "
            "loader processes on the same cores (two naive runs did not finish in 900 s); use "
            "--jobs for many small runs or --num-workers for image decoding, not both"
        )
    buffered = [n for n in names if exp.keeps_buffer(n)]
    if buffered and not mem_sizes:
        raise ValueError(f"{', '.join(buffered)} keep a buffer: give at least one buffer size")
    out = check_out_dir(Path(out))
    opts = RunOptions(
        data_root=None if data_root is None else str(data_root),
        quick=quick,
        max_experiences=max_experiences,
        progress=progress and jobs == 1,
        num_workers=int(num_workers),
        threads=threads,
        logs=logs,
    )
    # data (the loaders raise with the layout they expect), class-incremental, images
    try:
        first = build_benchmark(exp.benchmark, opts.data_root, seeds[0])
    except FileNotFoundError as err:
        hint = exp.notes.get("data_root_hint")
        raise FileNotFoundError(f"{err}\nData: {hint}" if hint else str(err)) from err
    check_class_incremental(first)
    if check_images:
        problems = check_data(first)
        if problems:
            shown = "\n  ".join(problems[:50])
            raise ValueError(
                f"{len(problems)} item(s) could not be read; fix or remove them:\n  {shown}"
            )
    if threads is not None:
        torch.set_num_threads(threads)

    # ---- 2. what is done, what changed, what is left ---------------------------------------
    keys = plan_runs(exp, names, seeds, mem_sizes)
    results_path = out / "results.json"
    _read_results(results_path)  # an unreadable results.json stops here, naming its backup
    (out / "runs").mkdir(exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    records: dict[RunKey, dict] = {}
    todo: list[RunKey] = []
    for key in keys:
        settings = run_settings(exp, key, opts)
        fp = fingerprint(settings)
        path = out / "runs" / f"{key.name}.json"
        rec = _load_record(path) if path.exists() else None
        if rec is not None and rec.get("fingerprint") == fp:
            records[key] = rec
            continue
        if rec is not None:
            changed = sorted(k for k in settings if settings[k] != rec.get("settings", {}).get(k))
            log(
                f"{key.name}: settings changed since it ran ({', '.join(changed) or 'format'}); "
                "running it again"
            )
            set_aside(path, "stale")
            remove_checkpoint(out / "checkpoints" / f"{key.name}.pkl")
            shutil.rmtree(out / "work" / key.name, ignore_errors=True)
        todo.append(key)
    if len(records):
        log(f"{len(records)} finished run(s) reused from {out / 'runs'}; {len(todo)} to run")
    extras = _other_finished_runs(out, full, exp, keys, opts)

    main = is_main_process()

    def finish(key: RunKey, record: dict) -> None:
        settings = run_settings(exp, key, opts)
        record = {**record, "fingerprint": fingerprint(settings), "settings": settings}
        records[key] = record
        if main:  # under accelerate launch every process trains; one writes
            atomic_write(out / "runs" / f"{key.name}.json", json.dumps(record, indent=1))
            _write_results(results_path, _collect(exp, keys, records, extras))
            remove_checkpoint(out / "checkpoints" / f"{key.name}.pkl")
        wait_for_everyone()

    # ---- 3. run ---------------------------------------------------------------------------
    bar = tqdm(
        total=len(todo), desc=exp.name or exp.benchmark["name"], unit="run", disable=not progress
    )
    finished: list[str] = []
    if jobs == 1 or len(todo) <= 1:
        for i, key in enumerate(todo):
            bar.set_postfix_str(key.name)
            try:
                record = _execute(exp, key, opts, out)
            except KeyboardInterrupt:
                bar.close()
                raise _interrupted(finished, [key.name], len(todo) - i - 1) from None
            finish(key, record)
            finished.append(key.name)
            bar.update(1)
    else:
        infos = _picklable_infos(sorted({key.strategy for key in todo}))
        _run_pool(todo, min(jobs, len(todo)), (exp, opts, str(out), infos), finish, bar)
    bar.close()
    results = _collect(exp, keys, records, extras)
    if main:
        _write_results(results_path, results)
        write_report(results, out)
    return results


def _run_pool(todo: list[RunKey], jobs: int, payload: tuple, finish, bar) -> None:
    """The runs of ``todo`` in ``jobs`` spawned processes. On Ctrl-C the queued runs are
    cancelled and the workers terminated at once (each resumes from its checkpoint next time)."""
    exp, opts, out, infos = payload
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init)
    futures = {pool.submit(_worker, (exp, key, opts, out, infos)): key for key in todo}
    finished: list[str] = []
    try:
        for fut in as_completed(futures):
            finish(futures[fut], fut.result())
            finished.append(futures[fut].name)
            bar.update(1)
    except KeyboardInterrupt:
        running = [k.name for f, k in futures.items() if f.running()]
        queued = sum(1 for f in futures if not f.done() and not f.running())
        for f in futures:
            f.cancel()
        for proc in list((pool._processes or {}).values()):  # no public way to stop a worker
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        raise _interrupted(finished, running, queued) from None
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def with_dreamer(exp: Experiment, dreamer: str, names: Sequence[str]) -> Experiment:
    """``exp`` with ``dreamer`` (a local folder is made absolute) in the section of every strategy
    of ``names`` whose config has a ``dreamer`` field."""
    local = Path(dreamer).expanduser()
    value = str(local.resolve()) if local.exists() else str(dreamer)
    sections = dict(exp.strategies)
    hits = []
    for name in names:
        cfg_type = get_strategy(name).config_type
        if cfg_type is not None and "dreamer" in {f.name for f in dataclasses.fields(cfg_type)}:
            sections[name] = {**sections.get(name, {}), "dreamer": value}
            hits.append(name)
    if not hits:
        raise ValueError(f"--dreamer given, but none of {', '.join(names)} uses a dreamer")
    return dataclasses.replace(exp, strategies=sections)


def _other_finished_runs(
    out: Path, full: Experiment, exp: Experiment, keys: list[RunKey], opts: RunOptions
) -> list[dict]:
    """Finished runs in ``out/runs`` that this call did not ask for (other strategies or seeds of
    earlier calls) and whose settings are still those of this experiment: they stay in the
    report, so a call with fewer strategies never hides earlier results."""
    asked = {k.name for k in keys}
    extras = []
    for path in sorted((out / "runs").glob("*.json")):
        if path.stem in asked:
            continue
        try:
            rec = json.loads(path.read_text())
            key = RunKey(rec["strategy"], int(rec["seed"]), rec["mem_size"])
            section = full.strategies.get(key.strategy, exp.strategies.get(key.strategy, {}))
            other = dataclasses.replace(exp, strategies={key.strategy: section})
            if rec.get("fingerprint") == fingerprint(run_settings(other, key, opts)):
                extras.append(rec)
        except (ValueError, KeyError, TypeError, OSError):
            continue  # not a record of this experiment
    return sorted(extras, key=lambda r: (r["seed"], r["strategy"], r["mem_size"] or 0))


def _collect(
    exp: Experiment, keys: list[RunKey], records: dict[RunKey, dict], extras: Sequence[dict] = ()
) -> dict:
    """``results.json``'s content: the resolved experiment and the finished runs in plan order
    (the same whatever order they finished in), then the other still-valid runs of the folder."""
    return {
        "experiment": exp.to_dict(),
        "runs": [records[k] for k in keys if k in records] + list(extras),
    }


def dry_run(
    exp: Experiment,
    *,
    data_root=None,
    strategies=None,
    seeds=None,
    device=None,
    quick: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Build every strategy once and time one training step (and, for strategies that dream, one
    micro-batch of dreaming: the preflight each strategy registers), without training.
    Prints the runs that ``run`` would do and the estimates; returns them."""
    if device is not None:
        exp = dataclasses.replace(exp, device=device)
    exp = dataclasses.replace(exp, device=check_device(exp.device))
    names = [resolve_name(s) for s in (strategies or exp.strategies)]
    seeds = check_seeds(exp.seeds if seeds is None else seeds)
    opts = RunOptions(
        data_root=None if data_root is None else str(data_root), quick=quick, progress=False
    )
    benchmark = build_benchmark(exp.benchmark, opts.data_root, seeds[0])
    check_class_incremental(benchmark)
    keys = plan_runs(exp, names, seeds, exp.mem_sizes)
    log(
        f"{exp.name or 'experiment'}: {len(keys)} run(s) of {len(benchmark.train_stream)} "
        f"experiences, image shape {benchmark_image_shape(benchmark)}, device {exp.device}"
    )
    reports = []
    for name in names:
        key = RunKey(name, seeds[0], exp.mem_sizes[0] if exp.keeps_buffer(name) else None)
        _, strategy = build_run(exp, key, opts, benchmark=benchmark)
        report = {"strategy": name, **_time_training_step(strategy, benchmark, exp)}
        dreaming = _method_preflight(name, strategy, benchmark, exp)
        if dreaming is not None:
            report["dreaming"] = dreaming.to_dict()
            log(dreaming.to_text())
        reports.append(report)
        log(json.dumps({k: v for k, v in report.items() if k != "dreaming"}, default=str))
    return reports


def _method_preflight(name: str, strategy, benchmark, exp: Experiment):
    """The preflight the strategy registered (:class:`~avalanche_d2l.registry.StrategyInfo`;
    D2L: one micro-batch of dreaming, one generation batch and one training step, extrapolated
    to a run, raising on CUDA with the settings to change when a phase cannot fit), or ``None``."""
    check = get_strategy(name).preflight
    if check is None:
        return None
    return check(
        strategy,
        benchmark,
        train_mb_size=exp.training.train_mb_size,
        epochs=exp.training.optimizer.epochs,
    )


def _time_training_step(strategy, benchmark, exp: Experiment) -> dict:
    """Seconds and peak memory of one training minibatch of the classifier, and the estimated
    classifier-training time of one run (steps x step time)."""
    model = strategy.model.to(strategy.device)
    ds = benchmark.train_stream[0].dataset
    n = min(exp.training.train_mb_size, len(ds))
    x = torch.stack([ds[i][0] for i in range(n)]).to(strategy.device)
    y = torch.tensor([int(ds[i][1]) for i in range(n)], device=strategy.device)
    cuda = strategy.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x)[:, : int(benchmark.n_classes)], y)
    loss.backward()
    step_s = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    n_train = sum(len(e.dataset) for e in benchmark.train_stream)
    steps = n_train / exp.training.train_mb_size * exp.training.optimizer.epochs
    out = {
        "train_step_s": round(step_s, 4),
        "estimated_training_h": round(steps * step_s / 3600, 3),
    }
    if cuda:
        out["train_step_peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the command line: avalanche-d2l run ...")
