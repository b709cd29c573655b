"""``run --dry-run``: every strategy of an experiment built once, one training step timed and, for
strategies that dream, one micro-batch of dreaming (the preflight each strategy registers); no
training."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable

import torch

from avalanche_d2l.experiments.builders import (
    build_benchmark,
    check_class_incremental,
)
from avalanche_d2l.experiments.schema import Experiment, check_seeds, resolve_name
from avalanche_d2l.registry import (
    benchmark_image_shape,
    get_strategy,
)

from .one_run import RunKey, RunOptions, build_run
from .runner import check_device, plan_runs

__all__ = ["dry_run"]


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
