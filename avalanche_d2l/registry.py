"""Strategy registry: names -> factories, shared by the command line and the benchmarks.

Every factory has the same keyword-only signature::

    factory(*, model, optimizer, criterion, benchmark, run: RunConfig, evaluator, device,
            plugins=None) -> SupervisedTemplate

so that all strategies of a comparison get the same model, optimiser and epochs.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "RunConfig",
    "register_strategy",
    "get_strategy_factory",
    "strategy_names",
    "build_strategy",
    "benchmark_image_shape",
]


@dataclass
class RunConfig:
    """Settings shared by every strategy of one comparison run."""

    benchmark: str = "split_digits"
    model: str = "small_cnn"
    feature_layer: str = "block3"
    epochs: int = 10
    train_mb_size: int = 32
    eval_mb_size: int = 256
    lr: float = 1e-3
    mem_size: int = 100
    seed: int = 0
    quick: bool = False
    device: str = "cpu"


Factory = Callable[..., Any]
_REGISTRY: dict[str, Factory] = {}
# Method strategies live in their own modules; imported on first use so that the command line
# and the built-in baselines do not pay for diffusers at import time.
_LAZY: dict[str, str] = {
    "genifer": "avalanche_d2l.strategies.genifer:build_genifer",
    "d2l": "avalanche_d2l.strategies.d2l:build_d2l",
}


def register_strategy(name: str, factory: Factory, *, overwrite: bool = False) -> None:
    """Register ``factory`` under ``name``; warns when an existing name is replaced."""
    if name in _REGISTRY or name in _LAZY:
        if not overwrite:
            warnings.warn(f"strategy {name!r} is already registered; overwriting it", stacklevel=2)
        _LAZY.pop(name, None)
    _REGISTRY[name] = factory


def strategy_names() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))


def get_strategy_factory(name: str) -> Factory:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _LAZY:
        module, attr = _LAZY[name].split(":")
        _REGISTRY[name] = getattr(importlib.import_module(module), attr)
        return _REGISTRY[name]
    raise ValueError(
        f"unknown strategy {name!r}; valid names: {', '.join(strategy_names())}"
    )


def benchmark_image_shape(benchmark) -> tuple[int, int, int]:
    """(C, H, W) of the first training image of ``benchmark``."""
    x = benchmark.train_stream[0].dataset[0][0]
    return tuple(int(s) for s in x.shape)  # type: ignore[return-value]


def build_strategy(name: str, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                   criterion: nn.Module, benchmark, run: RunConfig, evaluator, device,
                   plugins=None):
    """Build the registered strategy ``name`` with the shared settings of ``run``."""
    factory = get_strategy_factory(name)
    return factory(model=model, optimizer=optimizer, criterion=criterion, benchmark=benchmark,
                   run=run, evaluator=evaluator, device=device, plugins=plugins)
