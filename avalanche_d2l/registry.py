"""Strategy registry: names -> factories, shared by the command line and the benchmarks.

Every factory has the same keyword-only signature::

    factory(*, model, optimizer, criterion, benchmark, run: RunConfig, evaluator, device,
            plugins=None) -> SupervisedTemplate

so that all strategies of a comparison get the same model, optimiser and epochs.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    #: folder a strategy may use for files of this run (e.g. D2L's dream cache); None = none
    work_dir: str | None = None
    #: show the strategies' own progress bars (GAN steps, dreaming); ``compare --no-progress``
    progress: bool = True


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


# --------------------------------------------------------------------------------------------
# Avalanche's built-in strategies, with the settings of the comparison.
# --------------------------------------------------------------------------------------------
def _common(*, model, optimizer, criterion, run: RunConfig, evaluator, device, plugins):
    return dict(
        model=model,
        optimizer=optimizer,
        criterion=criterion,
        train_mb_size=run.train_mb_size,
        train_epochs=run.epochs,
        eval_mb_size=run.eval_mb_size,
        device=device,
        plugins=list(plugins or []),
        evaluator=evaluator,
        eval_every=-1,
    )


def _naive(*, benchmark, **kw):
    from avalanche.training import Naive

    return Naive(**_common(**kw))


def _cumulative(*, benchmark, **kw):
    from avalanche.training import Cumulative

    return Cumulative(**_common(**kw))


def _lwf(*, benchmark, **kw):
    from avalanche.training import LwF

    return LwF(alpha=1.0, temperature=2.0, **_common(**kw))


def _ewc(*, benchmark, **kw):
    from avalanche.training import EWC

    return EWC(ewc_lambda=100.0, mode="separate", **_common(**kw))


def _replay(*, benchmark, **kw):
    from avalanche.training import Replay

    return Replay(mem_size=kw["run"].mem_size, **_common(**kw))


def _der(*, benchmark, **kw):
    from avalanche.training import DER

    return DER(mem_size=kw["run"].mem_size, alpha=0.1, beta=0.5, **_common(**kw))


def _er_ace(*, benchmark, **kw):
    from avalanche.training import ER_ACE

    return ER_ACE(mem_size=kw["run"].mem_size, batch_size_mem=kw["run"].train_mb_size,
                  **_common(**kw))


def _generative_replay(*, benchmark, **kw):
    """Avalanche's deep generative replay with its MLP VAE sized to the benchmark's images
    (Avalanche's default VAE assumes 28x28 MNIST)."""
    from avalanche.models.generator import MlpVAE, VAE_loss
    from avalanche.training import GenerativeReplay, VAETraining
    from avalanche.training.plugins import GenerativeReplayPlugin

    run: RunConfig = kw["run"]
    device = kw["device"]
    vae = MlpVAE(benchmark_image_shape(benchmark), nhid=16, n_classes=benchmark.n_classes,
                 device=device)
    vae_strategy = VAETraining(
        model=vae,
        optimizer=torch.optim.Adam(vae.parameters(), lr=0.01, weight_decay=1e-4),
        criterion=VAE_loss,
        train_mb_size=run.train_mb_size,
        train_epochs=run.epochs,
        eval_mb_size=run.eval_mb_size,
        device=device,
        plugins=[GenerativeReplayPlugin()],
        evaluator=None,
    )
    return GenerativeReplay(generator_strategy=vae_strategy, **_common(**kw))


for _name, _factory in {
    "naive": _naive,
    "cumulative": _cumulative,
    "lwf": _lwf,
    "ewc": _ewc,
    "replay": _replay,
    "der": _der,
    "er_ace": _er_ace,
    "generative_replay": _generative_replay,
}.items():
    register_strategy(_name, _factory, overwrite=True)
