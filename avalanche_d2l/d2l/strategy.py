"""The D2L strategy (Experience Replay + :class:`~avalanche_d2l.d2l.plugin.D2LPlugin`) and the
registry's ``d2l``, ``er_ace_d2l`` and ``der_d2l`` (Avalanche's ``Replay``, ``ER_ACE`` and ``DER``
with the plugin), each with its dry-run preflight.

``D2LPlugin`` composes with any rehearsal host and wraps the host's model itself::

    ER_ACE(model=net, optimizer=opt, mem_size=100, plugins=[D2LPlugin()])
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from ..registry import RunConfig, benchmark_image_shape, register_strategy
from .config import D2LConfig, DreamConfig, quick_dream_config
from .heads import add_missing_params, wrap_model
from .plugin import D2LPlugin
from .space import infer_input_space

__all__ = [
    "D2L",
    "add_missing_params",
    "build_d2l",
    "build_der_d2l",
    "build_er_ace_d2l",
    "d2l_preflight",
    "wrap_model",
]


class D2L(SupervisedTemplate):
    """Dream2Learn on Experience Replay: ``ReplayPlugin`` + :class:`D2LPlugin`.

    The model is wrapped in :class:`~avalanche_d2l.d2l.heads.DreamHeads` (here, or by the plugin
    at the first experience when the feature layer must be found from the images); the input
    space is learned from the first experience (or ``image_shape``) and the dreamer fitted to it
    before any training.

    Args:
        model: any classifier returning ``(B, n_out)`` logits.
        optimizer: optimizer over ``model``'s parameters.
        criterion: loss on class-space outputs (default cross-entropy).
        mem_size: replay buffer size.
        config: the :class:`D2LConfig` (default: the CPU preset); the arguments below override
            its fields when given.
        dreamer: a ``Dreamer``, ``"offline"``/``"offline-rgb"``, or a hub id / local path.
        dream: the :class:`DreamConfig` (``dream_config`` is the same argument's former name).
        feature_layer: module whose output is the learner's features (default: ``"features"``,
            else the module feeding the last ``nn.Linear``, found at the first experience).
        n_classes: classes of the stream (default: out features of the model's last Linear;
            the benchmark's when the model is wrapped at the first experience).
        n_extra_heads: dream-only heads beyond one per class.
        image_shape: ``(C, H, W)`` of the inputs (default: from the first experience).
        class_names: the stream's class names (Stable Diffusion prompts start from them).
        cache_dir: folder for the dream-set cache.
        dreamer_device: where the dreamer runs (default: ``device``).
        train_mb_size, train_epochs, eval_mb_size, device, plugins, evaluator, eval_every,
            peval_mode: as in Avalanche's ``SupervisedTemplate``.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: nn.Module | None = None,
        mem_size: int = 200,
        config: D2LConfig | None = None,
        dreamer=None,
        dream: DreamConfig | None = None,
        dream_config: DreamConfig | None = None,
        feature_layer: str | None = None,
        n_classes: int | None = None,
        n_extra_heads: int | None = None,
        image_shape: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        train_mb_size: int = 32,
        train_epochs: int = 1,
        eval_mb_size: int | None = None,
        device: str | torch.device = "cpu",
        plugins: Sequence[Any] | None = None,
        evaluator: EvaluationPlugin | Callable[[], EvaluationPlugin] | None = default_evaluator,
        eval_every: int = -1,
        peval_mode: str = "epoch",
        cache_dir: str | os.PathLike | None = None,
        dreamer_device: str | torch.device | None = None,
    ):
        if mem_size < 1:
            raise ValueError(f"D2L needs a replay buffer: mem_size must be >= 1, got {mem_size}")
        cfg = config if config is not None else D2LConfig()
        n_extra = cfg.n_extra_heads if n_extra_heads is None else n_extra_heads
        findable = feature_layer or image_shape or "features" in dict(model.named_modules())
        wrapped = model  # the plugin wraps it at the first experience, when its images are known
        if findable:
            wrapped = wrap_model(
                model,
                n_classes=n_classes,
                feature_layer=feature_layer,
                image_shape=image_shape,
                n_extra_heads=n_extra,
            )
            add_missing_params(optimizer, wrapped)
        self.d2l_plugin = D2LPlugin(
            dreamer if dreamer is not None else cfg.dreamer,
            dream or dream_config or cfg.dream,
            image_shape=image_shape,
            dreamer_overrides=cfg.dreamer_overrides,
            dreamer_device=dreamer_device if dreamer_device is not None else device,
            cache_dir=cache_dir,
            class_names=class_names,
            n_classes=n_classes,
            n_extra_heads=n_extra,
        )
        self.replay_plugin = ReplayPlugin(mem_size=mem_size)
        super().__init__(
            model=wrapped,
            optimizer=optimizer,
            criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=[self.replay_plugin, self.d2l_plugin, *(plugins or [])],
            evaluator=evaluator,
            eval_every=eval_every,
            peval_mode=peval_mode,
        )


# ------------------------------------------------------------------------------------------------
# registry factories: the run's settings -> a sized strategy


def _resolved(run: RunConfig, config: D2LConfig | None) -> D2LConfig:
    """``config`` with the run's seed, progress, precision and quick settings applied."""
    cfg = config if config is not None else D2LConfig()
    dream = dataclasses.replace(cfg.dream, seed=run.seed, progress=run.progress and not run.quick)
    if run.quick:
        keep = {k: getattr(cfg.dream, k) for k in ("source", "prompts", "labels", "stop")}
        dream = dataclasses.replace(quick_dream_config(run.seed), **keep)
    overrides = dict(cfg.dreamer_overrides)
    if getattr(run, "precision", "no") not in (None, "no"):
        overrides.setdefault("mixed_precision", run.precision)
    return dataclasses.replace(cfg, dream=dream, dreamer_overrides=overrides)


def _cache(run: RunConfig, config: D2LConfig) -> Path | None:
    return Path(run.work_dir) / "dreams" if run.work_dir and config.cache_dreams else None


def _parts(*, model, benchmark, run: RunConfig, config: D2LConfig, device):
    """(wrapped model, D2LPlugin), sized to the benchmark's images before the host is built."""
    layer = "features" if "features" in dict(model.named_modules()) else run.feature_layer
    wrapped = wrap_model(
        model,
        n_classes=benchmark.n_classes,
        n_extra_heads=config.n_extra_heads,
        feature_layer=layer,
        image_shape=benchmark_image_shape(benchmark),
    )
    plugin = D2LPlugin(
        config.dreamer,
        config.dream,
        dreamer_overrides=config.dreamer_overrides,
        dreamer_device=getattr(run, "dreamer_device", None) or device,
        cache_dir=_cache(run, config),
        class_names=getattr(benchmark, "class_names", None),
    )
    plugin.fit(infer_input_space(benchmark.train_stream[0].dataset), wrapped)
    return wrapped, plugin


def _host_config(name: str, overrides: Mapping[str, Any]):
    """The registry's typed config of host ``name`` with ``overrides`` (validated)."""
    from ..registry import config_from_dict, get_strategy

    info = get_strategy(name)
    if info.config_type is None:
        if overrides:
            raise ValueError(f"D2LConfig.host: {name} takes no settings, got {dict(overrides)}")
        return {}
    host = config_from_dict(info.config_type, dict(overrides), where=f"D2LConfig.host ({name})")
    return dataclasses.asdict(host)


def _build(
    host: str,
    *,
    model,
    optimizer,
    criterion,
    benchmark,
    run,
    config,
    evaluator,
    device,
    plugins=None,
):
    from avalanche.training import DER, ER_ACE

    cfg = _resolved(run, config)
    if host == "replay":
        if cfg.host:
            raise ValueError(f"D2LConfig.host: the ER host takes no settings, got {cfg.host}")
        layer = "features" if "features" in dict(model.named_modules()) else run.feature_layer
        strategy = D2L(
            model=model,
            optimizer=optimizer,
            criterion=criterion,
            mem_size=run.mem_size,
            config=cfg,
            feature_layer=layer,
            n_classes=benchmark.n_classes,
            image_shape=benchmark_image_shape(benchmark),
            class_names=getattr(benchmark, "class_names", None),
            train_mb_size=run.train_mb_size,
            train_epochs=run.epochs,
            eval_mb_size=run.eval_mb_size,
            device=device,
            plugins=plugins,
            evaluator=evaluator,
            eval_every=-1,
            cache_dir=_cache(run, cfg),
            dreamer_device=getattr(run, "dreamer_device", None) or device,
        )
        strategy.d2l_plugin.fit(infer_input_space(benchmark.train_stream[0].dataset))
        return strategy
    wrapped, plugin = _parts(model=model, benchmark=benchmark, run=run, config=cfg, device=device)
    add_missing_params(optimizer, wrapped)
    kw = {"batch_size_mem": run.train_mb_size} if host == "er_ace" else {}
    kw.update(_host_config(host, cfg.host))
    if host == "er_ace" and not kw.get("batch_size_mem"):
        kw["batch_size_mem"] = run.train_mb_size
    cls = {"er_ace": ER_ACE, "der": DER}[host]
    strategy = cls(
        model=wrapped,
        optimizer=optimizer,
        criterion=criterion,
        mem_size=run.mem_size,
        train_mb_size=run.train_mb_size,
        train_epochs=run.epochs,
        eval_mb_size=run.eval_mb_size,
        device=device,
        evaluator=evaluator,
        eval_every=-1,
        plugins=[plugin, *(plugins or [])],
        **kw,
    )
    strategy.d2l_plugin = plugin
    return strategy


def d2l_preflight(strategy, benchmark, *, train_mb_size: int, epochs: int):
    """The engine's dry run for a D2L strategy: one micro-batch of dreaming, one generation
    batch and one training step, extrapolated to a run (``None`` when dreams need no dreamer)."""
    from ..dreaming.preflight import dreaming_plan, preflight

    plugin = strategy.d2l_plugin
    if not plugin.config.uses_dreamer:
        return None
    plugin.fit(infer_input_space(benchmark.train_stream[0].dataset), strategy.model)
    n_classes = int(benchmark.n_classes)
    n_dream, phases = dreaming_plan(
        n_classes=n_classes,
        n_experiences=len(benchmark.train_stream),
        dream_config=plugin.config,
        n_extra_heads=strategy.model.n_heads - n_classes,
    )
    steps = sum(len(e.dataset) for e in benchmark.train_stream) // train_mb_size
    return preflight(
        dreamer=plugin.dreamer,
        classifier=strategy.model.to(strategy.device),
        dream_config=plugin.config,
        image_shape=plugin.space.shape,
        n_dream_classes=n_dream,
        n_dreaming_phases=phases,
        train_batch=train_mb_size,
        device=strategy.device,
        train_steps=steps * epochs,
    )


def _register(name: str, host: str, description: str):
    def factory(
        *,
        model,
        optimizer,
        criterion,
        benchmark,
        run: RunConfig,
        config=None,
        evaluator,
        device,
        plugins=None,
    ):
        return _build(
            host,
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

    factory.__name__ = factory.__qualname__ = f"build_{name}"
    factory.__doc__ = f"Registry factory ``{name}``: {description}."
    return register_strategy(
        name,
        factory,
        config=D2LConfig,
        keeps_buffer=True,
        description=description,
        preflight=d2l_preflight,
    )


build_d2l = _register("d2l", "replay", "D2L (Dream2Learn) on Experience Replay")
build_er_ace_d2l = _register("er_ace_d2l", "er_ace", "D2L on ER-ACE (Avalanche ER_ACE + D2LPlugin)")
build_der_d2l = _register("der_d2l", "der", "D2L on DER++ (Avalanche DER + D2LPlugin)")
