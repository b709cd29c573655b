"""Strategy registry: names -> factories with their metadata, filled by the method files.

A method registers itself in its own module of :mod:`avalanche_d2l.strategies` (modules there are
imported on first use of the registry, so a new method is one file)::

    @register_strategy("genifer", config=GeniferConfig, keeps_buffer=False,
                       description="data-free feature-driven image replay")
    def build_genifer(*, model, optimizer, criterion, benchmark, run, config, evaluator, device,
                      plugins=None) -> SupervisedTemplate: ...

Every factory has that keyword-only signature, so all strategies of a comparison get the same
model, optimiser and epochs. ``config`` is an instance of the registered ``config`` dataclass,
already resolved by the experiment engine (``config_type.from_dict(section)``; the class defaults
are the CPU preset). Avalanche's baselines are registered below with small typed configs of their
own hyper-parameters, so every run records them.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

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
]


@dataclass
class RunConfig:
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
_DISCOVERED = False


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
    a script or notebook; the package's own are found by discovery)."""
    _discover()
    for info in infos:
        if info.name not in _REGISTRY:
            _REGISTRY[info.name] = info


def _discover() -> None:
    """Import every module of :mod:`avalanche_d2l.strategies` once (they register themselves)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    from avalanche_d2l import strategies

    for mod in pkgutil.iter_modules(strategies.__path__):
        importlib.import_module(f"{strategies.__name__}.{mod.name}")


def strategy_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_strategy(name: str) -> StrategyInfo:
    """The registered strategy ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    _discover()
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


def check_keys(section: Any, allowed: set[str], where: str) -> dict:
    """``section`` as a dict; unknown keys are an error listing the valid ones."""
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(section).__name__}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(allowed)}")
    return section


def config_from_dict(cls: type, data: Mapping[str, Any], *, where: str = ""):
    """``cls.from_dict(data)`` when the class defines one, else ``cls(**data)`` for a flat
    dataclass; unknown keys are an error listing the valid ones."""
    if hasattr(cls, "from_dict"):
        return cls.from_dict(dict(data))
    from avalanche_d2l.fields import typed_fields

    names = {f.name for f in dataclasses.fields(cls)}
    where = f"the settings of {where or cls.__name__}"
    return cls(**typed_fields(cls, check_keys(dict(data), names, where), where))


def config_to_dict(config) -> dict[str, Any] | None:
    """JSON-able dict of a typed config (``to_dict`` when defined), ``None`` for no config."""
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------------------------
# Avalanche's built-in strategies, with typed configs of their hyper-parameters.
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


@dataclass
class LwFConfig:
    """Avalanche ``LwF``: distillation weight and temperature."""

    alpha: float = 1.0
    temperature: float = 2.0


@dataclass
class EWCConfig:
    """Avalanche ``EWC``: penalty weight and mode."""

    ewc_lambda: float = 100.0
    mode: str = "separate"


@dataclass
class DERConfig:
    """Avalanche ``DER`` (DER++): logit-distillation weight ``alpha``, replay CE weight ``beta``."""

    alpha: float = 0.1
    beta: float = 0.5


@dataclass
class ERACEConfig:
    """Avalanche ``ER_ACE``: buffer minibatch size (``None``: the training minibatch size)."""

    batch_size_mem: int | None = None


@dataclass
class BiCConfig:
    """Avalanche ``BiC`` (bias correction, Wu et al. 2019), Avalanche's defaults.

    ``val_fraction`` of the buffer size is held out of the training data (per class) to fit the
    bias layer for ``stage_2_epochs`` epochs at ``stage_2_lr`` after every experience but the
    first; ``distill_weight`` -1 weighs distillation by the fraction of old classes; logits are
    distilled at ``temperature``.
    """

    val_fraction: float = 0.1
    temperature: int = 2
    stage_2_epochs: int = 200
    distill_weight: float = -1.0
    stage_2_lr: float = 0.1


@dataclass
class GenerativeReplayConfig:
    """Avalanche ``GenerativeReplay`` with its MLP VAE sized to the benchmark's images."""

    vae_hidden: int = 16
    vae_lr: float = 0.01
    vae_weight_decay: float = 1e-4


@register_strategy("naive", description="Avalanche Naive: fine-tuning, no protection")
def _naive(*, benchmark, config, **kw):
    from avalanche.training import Naive

    return Naive(**_common(**kw))


@register_strategy(
    "cumulative", description="Avalanche Cumulative: joint training on all data so far"
)
def _cumulative(*, benchmark, config, **kw):
    from avalanche.training import Cumulative

    return Cumulative(**_common(**kw))


@register_strategy(
    "lwf", config=LwFConfig, description="Avalanche LwF: learning without forgetting"
)
def _lwf(*, benchmark, config: LwFConfig, **kw):
    from avalanche.training import LwF

    return LwF(alpha=config.alpha, temperature=config.temperature, **_common(**kw))


@register_strategy(
    "ewc", config=EWCConfig, description="Avalanche EWC: elastic weight consolidation"
)
def _ewc(*, benchmark, config: EWCConfig, **kw):
    from avalanche.training import EWC

    return EWC(ewc_lambda=config.ewc_lambda, mode=config.mode, **_common(**kw))


@register_strategy(
    "replay", keeps_buffer=True, description="Avalanche Replay (ER): reservoir buffer"
)
def _replay(*, benchmark, config, **kw):
    from avalanche.training import Replay

    return Replay(mem_size=kw["run"].mem_size, **_common(**kw))


@register_strategy(
    "der",
    config=DERConfig,
    keeps_buffer=True,
    description="Avalanche DER (DER++): replay with stored logits",
)
def _der(*, benchmark, config: DERConfig, **kw):
    from avalanche.training import DER

    return DER(mem_size=kw["run"].mem_size, alpha=config.alpha, beta=config.beta, **_common(**kw))


@register_strategy(
    "er_ace",
    config=ERACEConfig,
    keeps_buffer=True,
    description="Avalanche ER-ACE: asymmetric cross-entropy replay",
)
def _er_ace(*, benchmark, config: ERACEConfig, **kw):
    from avalanche.training import ER_ACE

    run: RunConfig = kw["run"]
    return ER_ACE(
        mem_size=run.mem_size,
        batch_size_mem=config.batch_size_mem or run.train_mb_size,
        **_common(**kw),
    )


from avalanche.training.plugins.bic import BiCPlugin  # noqa: E402 -- BiC's shim below


class _MultiStepLR(torch.optim.lr_scheduler.MultiStepLR):
    """``MultiStepLR`` that accepts (and drops) ``verbose``, which recent torch removed."""

    def __init__(self, *args, verbose=None, **kwargs):
        super().__init__(*args, **kwargs)


class TorchCompatBiCPlugin(BiCPlugin):
    """Avalanche 0.6's ``BiCPlugin``, unchanged except that its bias-correction stage runs on
    torch versions whose ``MultiStepLR`` has no ``verbose`` argument (Avalanche passes one)."""

    def bias_correction_step(self, strategy, *args, **kwargs):
        from avalanche.training.plugins import bic

        original, bic.MultiStepLR = bic.MultiStepLR, _MultiStepLR
        try:
            return super().bias_correction_step(strategy, *args, **kwargs)
        finally:
            bic.MultiStepLR = original


@register_strategy(
    "bic",
    config=BiCConfig,
    keeps_buffer=True,
    description="Avalanche BiC: replay, distillation and a bias layer fitted on held-out samples",
)
def _bic(*, benchmark, config: BiCConfig, **kw):
    """Avalanche's ``BiC`` strategy: ``SupervisedTemplate`` + its plugin, added after the
    run's plugins as ``BiC`` does."""
    from avalanche.training.templates import SupervisedTemplate

    common = _common(**kw)
    common["plugins"].append(
        TorchCompatBiCPlugin(
            mem_size=kw["run"].mem_size,
            val_percentage=config.val_fraction,
            T=config.temperature,
            stage_2_epochs=config.stage_2_epochs,
            lamb=config.distill_weight,
            lr=config.stage_2_lr,
        )
    )
    return SupervisedTemplate(**common)


@register_strategy(
    "generative_replay",
    config=GenerativeReplayConfig,
    description="Avalanche GenerativeReplay with an MLP VAE",
)
def _generative_replay(*, benchmark, config: GenerativeReplayConfig, **kw):
    """Avalanche's deep generative replay with its MLP VAE sized to the benchmark's images
    (Avalanche's default VAE assumes 28x28 MNIST)."""
    from avalanche.models.generator import MlpVAE, VAE_loss
    from avalanche.training import GenerativeReplay, VAETraining
    from avalanche.training.plugins import GenerativeReplayPlugin

    run: RunConfig = kw["run"]
    device = kw["device"]
    vae = MlpVAE(
        benchmark_image_shape(benchmark),
        nhid=config.vae_hidden,
        n_classes=benchmark.n_classes,
        device=device,
    )
    vae_strategy = VAETraining(
        model=vae,
        optimizer=torch.optim.Adam(
            vae.parameters(), lr=config.vae_lr, weight_decay=config.vae_weight_decay
        ),
        criterion=VAE_loss,
        train_mb_size=run.train_mb_size,
        train_epochs=run.epochs,
        eval_mb_size=run.eval_mb_size,
        device=device,
        plugins=[GenerativeReplayPlugin()],
        evaluator=None,
    )
    return GenerativeReplay(generator_strategy=vae_strategy, **_common(**kw))
