"""One run of an experiment (:mod:`.runner` plans them, runs them in this process or in worker
processes, and collects them): its settings and fingerprint, the strategy built the way the
comparison builds it, training with a checkpoint after every experience, and the record it writes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from avalanche.logging import InteractiveLogger
from tqdm.auto import tqdm

from avalanche_d2l.core.storage import set_aside
from avalanche_d2l.distributed import add_data_parallel
from avalanche_d2l.dreaming.accel import is_main_process, wait_for_everyone
from avalanche_d2l.experiments.builders import (
    RunLogs,
    build_benchmark,
    build_model,
)
from avalanche_d2l.experiments.guards import FiniteLossGuard
from avalanche_d2l.experiments.report import summarise_run
from avalanche_d2l.experiments.schedule import OptimSchedule
from avalanche_d2l.experiments.schema import Experiment
from avalanche_d2l.registry import (
    RunConfig,
    benchmark_image_shape,
    config_to_dict,
    ensure_registered,
    get_strategy,
)
from avalanche_d2l.utils import quiet_replay_deprecation, seed_everything

__all__ = [
    "QUICK_EPOCHS",
    "RunProgress",
    "PeakRSS",
    "RunKey",
    "RunOptions",
    "build_run",
    "fingerprint",
    "run_environment",
    "run_settings",
    "source_fingerprint",
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


class RunProgress(InteractiveLogger):
    """Avalanche's ``InteractiveLogger`` as a run's progress: its tqdm bar over each training
    epoch and each evaluated experience, labelled with the run and the experience, on stderr and
    gone when done (a command's output keeps one line per finished run). Its metric lines go to
    ``os.devnull``: the results, the text log (``--text-log``) and ``--tensorboard``/``--csv``
    keep them."""

    def __init__(self, desc: str):
        super().__init__()
        self.file = open(os.devnull, "w")  # noqa: SIM115 -- the logger's file, open for the run
        self.desc, self._label = desc, desc

    @property
    def _progress(self):
        if self._pbar is None:
            # shown whenever a run asks for progress: not switched off by a TQDM_DISABLE that
            # happened to be set when tqdm was first imported
            self._pbar = tqdm(
                leave=False, desc=self._label, file=sys.stderr, unit="it", disable=False
            )
        return self._pbar

    def before_training_exp(self, strategy, metric_values, **kwargs):
        self._label = f"{self.desc} exp {strategy.experience.current_experience}"
        super().before_training_exp(strategy, metric_values, **kwargs)

    def before_eval(self, strategy, metric_values, **kwargs):
        self._label = f"{self.desc} eval"
        super().before_eval(strategy, metric_values, **kwargs)


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


_SOURCE_FINGERPRINT: str | None = None


def source_fingerprint(root: Path | None = None) -> str:
    """A hash of the package's code (every ``.py`` file under ``avalanche_d2l/``, or under
    ``root``, by relative path and syntax tree without docstrings): recorded beside each run's
    settings so that a finished run made by other code can be told apart. Comments, docstrings
    and layout do not count. Not part of the settings' fingerprint: a code change that leaves
    results alone (most do) must not re-run every committed run."""
    global _SOURCE_FINGERPRINT
    if root is None and _SOURCE_FINGERPRINT is not None:
        return _SOURCE_FINGERPRINT
    base = root if root is not None else Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(base.rglob("*.py")):
        h.update(path.relative_to(base).as_posix().encode() + b"\0")
        h.update(_code_only(path.read_text(encoding="utf-8")).encode() + b"\0")
    digest = h.hexdigest()[:12]
    if root is None:
        _SOURCE_FINGERPRINT = digest
    return digest


def _code_only(text: str) -> str:
    """``text``'s syntax tree without docstrings, as text (comments and layout are not in it)."""
    import ast

    tree = ast.parse(text)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def run_environment() -> dict[str, str]:
    """What besides the settings and the code can change a run's numbers: the Python and
    numerical packages' versions and the CPU (its name, torch's kernel family for it, its vector
    instructions). The same code and settings gave LwF 0.165 on seed
    2 when the first table was made and 0.102 here later; which of these changed is not known.
    Recorded beside each run, not part of its key."""
    from importlib import metadata

    env = {"python": platform.python_version(), "machine": platform.machine()}
    for name in ("torch", "torchvision", "avalanche-lib", "numpy", "scikit-learn", "diffusers"):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = "not installed"
    env["cpu"] = _cpu_model()
    # two machines with one CPU name gave other float rounding: record which kernels torch
    # dispatches to and the vector instructions the CPU offers (what picks oneDNN's kernels)
    env["torch_cpu_capability"] = _torch_cpu_capability()
    env["cpu_vector_flags"] = " ".join(_cpu_flags(VECTOR_FLAGS)) or "none"
    return env


#: The CPU flags recorded beside a run (``/proc/cpuinfo`` names).
VECTOR_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "asimd",
    "sve",
)


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, ...]:
    """The lines of ``/proc/cpuinfo`` (read once per process; none where it does not exist)."""
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return ()


def _cpu_model() -> str:
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _cpu_flags(names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` that the first CPU's ``flags`` (x86) or ``Features`` (Arm) line lists."""
    for line in _cpuinfo():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            return [n for n in names if n in have]
    return []


def _torch_cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


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
    if opts.progress and main:
        logs["loggers"].append(RunProgress(f"{key.strategy} s{key.seed}"))
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
    """Pool workers ignore the terminal's Ctrl-C (the parent stops them), die with the parent,
    even when it is killed with SIGKILL (Linux: the parent-death signal), and keep freed CPU
    memory for reuse (:mod:`avalanche_d2l.core.allocator`: a worker lives for its runs only)."""
    from avalanche_d2l.core.allocator import reuse_freed_memory

    reuse_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
