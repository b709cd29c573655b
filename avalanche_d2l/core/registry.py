"""Strategy registry: names -> factories with their metadata, filled by the method files.

The registry knows no strategy. A method registers itself when its module is imported: the
package imports :mod:`avalanche_d2l.strategies`, which imports every module of its own
(Avalanche's baselines, D2L, Genifer), so a new method is one file there::

    @register_strategy("genifer", config=GeniferConfig, keeps_buffer=False,
                       description="data-free feature-driven image replay")
    def build_genifer(*, model, optimizer, criterion, benchmark, run, config, evaluator, device,
                      plugins=None) -> SupervisedTemplate: ...

Every factory has that keyword-only signature, so all strategies of a comparison get the same
model, optimiser and epochs. ``config`` is an instance of the registered ``config`` dataclass,
already resolved by the experiment engine (``config_type.from_dict(section)``; the class defaults
are the CPU preset). A method's expensive parts are measured for a dry run by the ``preflight``
it registers (:class:`StrategyInfo`), so the engine never imports a method.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from avalanche_d2l.core.config import ConfigBase, check_keys, dataclass_from_dict

__all__ = [
    "RunConfig",
    "StrategyInfo",
    "register_strategy",
    "unregister_strategy",
    "get_strategy",
    "strategy_names",
    "build_strategy",
    "benchmark_image_shape",
    "check_keys",
    "config_from_dict",
    "config_to_dict",
    "ensure_registered",
]


@dataclass
class RunConfig(ConfigBase):
    """Settings shared by every strategy of one run (filled by the experiment engine)."""

    benchmark: str = "split_digits"
    feature_layer: str = "block3"
    epochs: int = 10
    train_mb_size: int = 32
    eval_mb_size: int = 256
    mem_size: int = 100
    seed: int = 0
    #: tiny settings for tests and smoke runs
    quick: bool = False
    device: str = "cpu"
    #: folder a strategy may use for files of this run (e.g. D2L's dream cache); None = none
    work_dir: str | None = None
    #: show the strategies' own progress bars (GAN steps, dreaming)
    progress: bool = True
    #: mixed precision of the generative parts: "no", "bf16" or "fp16"
    precision: str = "no"
    #: device of a frozen generative model (D2L's dreamer); None = ``device``
    dreamer_device: str | None = None


Factory = Callable[..., Any]


@dataclass(frozen=True)
class StrategyInfo:
    """A registered strategy.

    Attributes:
        name: registry name.
        factory: the keyword-only factory (see the module docstring).
        config_type: the typed dataclass config of the method (``None``: no settings).
        keeps_buffer: whether it keeps real samples (rehearsal); buffer-free runs serve every
            buffer size of an experiment.
        description: one line for ``--list``/``--help``.
        preflight: ``preflight(strategy, benchmark, *, train_mb_size, epochs)`` measuring the
            method's own expensive parts for a dry run (a report with ``to_text``/``to_dict``,
            or ``None``); ``None``: nothing beyond the training step.
    """

    name: str
    factory: Factory
    config_type: type | None = None
    keeps_buffer: bool = False
    description: str = ""
    preflight: Callable[..., Any] | None = None

    def make_config(self, section: Mapping[str, Any] | None = None):
        """The typed config from an experiment file's section (``None``/``{}`` -> defaults)."""
        if self.config_type is None:
            if section:
                raise ValueError(f"strategy {self.name!r} takes no settings, got {dict(section)}")
            return None
        return config_from_dict(self.config_type, dict(section or {}), where=self.name)


_REGISTRY: dict[str, StrategyInfo] = {}


def register_strategy(
    name: str,
    factory: Factory | None = None,
    *,
    config: type | None = None,
    keeps_buffer: bool = False,
    description: str = "",
    overwrite: bool = False,
    preflight: Callable[..., Any] | None = None,
):
    """Register ``factory`` under ``name``; usable as a decorator (``factory`` omitted).
    ``preflight``: see :class:`StrategyInfo`.

    Replacing an existing name warns unless ``overwrite=True``.
    """

    def add(f: Factory) -> Factory:
        if name in _REGISTRY and not overwrite:
            warnings.warn(f"strategy {name!r} is already registered; overwriting it", stacklevel=3)
        doc = description or (f.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = StrategyInfo(name, f, config, keeps_buffer, doc, preflight)
        return f

    return add if factory is None else add(factory)


def unregister_strategy(name: str) -> StrategyInfo | None:
    """Remove ``name`` (returns what was registered, or ``None``)."""
    return _REGISTRY.pop(name, None)


def ensure_registered(infos: Sequence[StrategyInfo]) -> None:
    """Register the entries of ``infos`` this process lacks (a worker process of
    ``run_experiment(jobs > 1)`` receives the strategies its parent registered at run time, e.g. in
    a script or notebook; the package's own registered themselves when it was imported)."""
    for info in infos:
        if info.name not in _REGISTRY:
            _REGISTRY[info.name] = info


def strategy_names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def get_strategy(name: str) -> StrategyInfo:
    """The registered strategy ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; valid names: {', '.join(strategy_names())}")
    return _REGISTRY[name]


def benchmark_image_shape(benchmark) -> tuple[int, int, int]:
    """(C, H, W) of the first training image of ``benchmark``."""
    x = benchmark.train_stream[0].dataset[0][0]
    return tuple(int(s) for s in x.shape)  # type: ignore[return-value]


def build_strategy(
    name: str,
    *,
    model,
    optimizer,
    criterion,
    benchmark,
    run: RunConfig,
    evaluator,
    device,
    plugins=None,
    config=None,
):
    """Build the registered strategy ``name`` with the shared settings of ``run``.

    ``config``: the method's typed config, or a dict section, or ``None`` (defaults).
    """
    info = get_strategy(name)
    if config is None or isinstance(config, Mapping):
        config = info.make_config(config)
    return info.factory(
        model=model,
        optimizer=optimizer,
        criterion=criterion,
        benchmark=benchmark,
        run=run,
        config=config,
        evaluator=evaluator,
        device=device,
        plugins=plugins,
    )


def config_from_dict(cls: type, data: Mapping[str, Any], *, where: str = ""):
    """The typed config ``cls`` from an experiment file's section ``data``; unknown keys are an
    error listing the valid ones. ``where``: the strategy's name, for the message.

    A :class:`~avalanche_d2l.core.config.ConfigBase` config, or a class with a ``from_dict`` of
    its own, builds itself; a plain flat dataclass gets each value checked against its
    annotation."""
    section = f"the settings of {where or cls.__name__}"
    if isinstance(cls, type) and issubclass(cls, ConfigBase):
        return cls.from_dict(dict(data), where=section)
    if hasattr(cls, "from_dict"):
        return cls.from_dict(dict(data))
    if not isinstance(data, Mapping):
        raise ValueError(f"{section} must be a JSON object, got {type(data).__name__}")
    return dataclass_from_dict(cls, dict(data), where=section)


def config_to_dict(config) -> dict[str, Any] | None:
    """JSON-able dict of a typed config (``to_dict`` when defined), ``None`` for no config."""
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dataclasses.asdict(config)
