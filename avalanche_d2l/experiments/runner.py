"""The resumable runner of an experiment: one run per (strategy, seed, buffer size).

Layout of an output folder::

    OUT/results.json      {"experiment": <resolved experiment>, "runs": [one record per run]}
    OUT/results.json.bak  the previous version of results.json
    OUT/results.md, accuracy.png, summary.png
    OUT/runs/<run>.json   every finished run, written as soon as it ends (the durable store)
    OUT/checkpoints/      per-experience checkpoints of unfinished runs (Avalanche checkpointing),
                          each with the fingerprint of the settings it was started with
                          (``<run>.settings``): one made otherwise is set aside, not resumed
    OUT/work/<run>/       files of a run (D2L's dream cache)

Every run records the *resolved* settings that made it (experiment, the strategy's typed config,
buffer size, package version) and their fingerprint. Running again into the same folder skips
finished runs whose settings are unchanged, re-runs (and says so) those whose settings changed, and
resumes an interrupted run from its last finished experience: a killed run resumes to the same
numbers, since experience k of seed s always trains with the global seed ``s * 1000 + k``.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import pickle
import shutil
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm.auto import tqdm

from avalanche_d2l.checkpointing import remove_checkpoint
from avalanche_d2l.core.storage import atomic_write, set_aside
from avalanche_d2l.distributed import check_processes
from avalanche_d2l.dreaming.accel import is_main_process, num_processes, wait_for_everyone
from avalanche_d2l.experiments.builders import (
    RunLogs,
    build_benchmark,
    check_class_incremental,
)
from avalanche_d2l.experiments.lock import holds_output_lock
from avalanche_d2l.experiments.report import write_report
from avalanche_d2l.experiments.schema import Experiment, check_mem_sizes, check_seeds, resolve_name
from avalanche_d2l.registry import (
    get_strategy,
)

from .one_run import (
    QUICK_EPOCHS,
    PeakRSS,
    RunKey,
    RunOptions,
    RunProgress,
    _execute,
    _worker,
    _worker_init,
    build_run,
    fingerprint,
    run_environment,
    run_settings,
    source_fingerprint,
    train_with_checkpoints,
)

__all__ = [
    "RunProgress",
    "PeakRSS",
    "RunKey",
    "RunOptions",
    "build_run",
    "check_device",
    "check_out_dir",
    "run_experiment",
    "train_with_checkpoints",
]


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


def _checkpoint_settings_path(out: Path, key: RunKey) -> Path:
    """Beside a run's checkpoint: the fingerprint of the settings the run was started with."""
    return out / "checkpoints" / f"{key.name}.settings"


def _checkpoint_made_otherwise(out: Path, key: RunKey, fp: str) -> bool:
    """Whether ``key``'s unfinished run has a checkpoint whose recorded settings are not ``fp``
    (a changed default or experiment file): resuming it would train on with the old settings
    and record the new ones. A checkpoint without the record counts as made otherwise."""
    if not (out / "checkpoints" / f"{key.name}.pkl").exists():
        return False
    record = _checkpoint_settings_path(out, key)
    try:
        return record.read_text().strip() != fp
    except OSError:
        return True


def _drop_checkpoint(out: Path, key: RunKey) -> None:
    remove_checkpoint(out / "checkpoints" / f"{key.name}.pkl")
    _checkpoint_settings_path(out, key).unlink(missing_ok=True)


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
            _drop_checkpoint(out, key)
            shutil.rmtree(out / "work" / key.name, ignore_errors=True)
        elif _checkpoint_made_otherwise(out, key, fp) and is_main_process():
            aside = set_aside(out / "checkpoints" / f"{key.name}.pkl", "other-settings")
            _drop_checkpoint(out, key)
            shutil.rmtree(out / "work" / key.name, ignore_errors=True)
            log(
                f"{key.name}: its checkpoint was made with other settings (or by a version that "
                f"did not record them): set aside as {aside}; running it from the start"
            )
        todo.append(key)
    if is_main_process():  # what a checkpoint written from now on was made with
        for key in todo:
            atomic_write(
                _checkpoint_settings_path(out, key),
                fingerprint(run_settings(exp, key, opts)) + "\n",
                what="the checkpoint's settings record",
            )
    wait_for_everyone()
    if len(records):
        log(f"{len(records)} finished run(s) reused from {out / 'runs'}; {len(todo)} to run")
        code, env = source_fingerprint(), run_environment()
        other = sorted(
            k.name
            for k, r in records.items()
            if r.get("source") != code or r.get("environment") != env
        )
        if other:
            shown = ", ".join(other[:6]) + (", ..." if len(other) > 6 else "")
            log(
                f"{len(other)} of them were made by other code (source {code} here) or in "
                f"another environment (package versions, CPU): {shown}; their numbers may "
                "differ from what this code gives here (delete their files in "
                f"{out / 'runs'} to run them again)"
            )
    extras = _other_finished_runs(out, full, exp, keys, opts)

    main = is_main_process()

    def finish(key: RunKey, record: dict) -> None:
        settings = run_settings(exp, key, opts)
        record = {
            **record,
            "fingerprint": fingerprint(settings),
            "settings": settings,
            "source": source_fingerprint(),
            "environment": run_environment(),
        }
        records[key] = record
        if main:  # under accelerate launch every process trains; one writes
            atomic_write(out / "runs" / f"{key.name}.json", json.dumps(record, indent=1))
            _write_results(results_path, _collect(exp, keys, records, extras))
            _drop_checkpoint(out, key)
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
