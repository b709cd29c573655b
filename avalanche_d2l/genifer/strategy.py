"""The Genifer strategy (``SupervisedTemplate`` + :class:`GeniferPlugin`) and its registry entry."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from avalanche_d2l.genifer.config import GeniferConfig
from avalanche_d2l.genifer.plugin import GeniferPlugin
from avalanche_d2l.models.gan import StyleGenerator
from avalanche_d2l.registry import RunConfig, benchmark_image_shape, register_strategy
from avalanche_d2l.utils import get_module

__all__ = ["Genifer", "build_genifer"]


class Genifer(SupervisedTemplate):
    """Genifer strategy: ``SupervisedTemplate`` + :class:`GeniferPlugin` (``self.genifer``).

    Args:
        model: any classifier ``nn.Module`` (fixed single head or with an
            ``IncrementalClassifier`` head).
        optimizer: the classifier's optimiser.
        feature_layer: module name read by the discriminator and the feature distillation.
        criterion: classification loss on the real images.
        generator: optional :class:`StyleGenerator`; built from the data when omitted.
        config: :class:`GeniferConfig` (CPU preset when omitted).
        image_shape: ``(C, H, W)`` of the model's input; read from the first experience when
            omitted.
        checkpoint_dir: folder for mid-phase GAN checkpoints.
        train_mb_size, train_epochs, eval_mb_size, device, plugins, evaluator, eval_every,
            peval_mode: as for Avalanche's ``SupervisedTemplate``.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        feature_layer: str,
        criterion: nn.Module | None = None,
        generator: StyleGenerator | None = None,
        config: GeniferConfig | None = None,
        image_shape: Sequence[int] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        train_mb_size: int = 32,
        train_epochs: int = 1,
        eval_mb_size: int = 256,
        device: str | torch.device = "cpu",
        plugins: Sequence[Any] | None = None,
        evaluator=default_evaluator,
        eval_every: int = -1,
        peval_mode: str = "epoch",
    ):
        get_module(model, feature_layer)  # fail early with the list of valid names
        plugin = GeniferPlugin(
            feature_layer=feature_layer,
            config=config,
            generator=generator,
            image_shape=image_shape,
            checkpoint_dir=checkpoint_dir,
        )
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=[plugin, *(plugins or [])],
            evaluator=evaluator,
            eval_every=eval_every,
            peval_mode=peval_mode,
        )
        self.genifer = plugin


@register_strategy(
    "genifer",
    config=GeniferConfig,
    keeps_buffer=False,
    description="Genifer: data-free generative feature-driven image replay",
)
def build_genifer(
    *,
    model,
    optimizer,
    criterion,
    benchmark,
    run: RunConfig,
    config: GeniferConfig | None,
    evaluator,
    device,
    plugins=None,
) -> Genifer:
    """Registry factory: Genifer with ``config`` (class defaults when ``None``), seeded by
    ``run.seed``, shortened by ``run.quick``, its GAN checkpoints under ``run.work_dir``."""
    cfg = config or GeniferConfig()
    shape = benchmark_image_shape(benchmark)
    cfg = replace(
        cfg,
        seed=run.seed,
        num_classes=cfg.num_classes or int(benchmark.n_classes),
        progress=cfg.progress and run.progress,
    )
    if getattr(run, "precision", "no") != "no":
        cfg = replace(cfg, gan=replace(cfg.gan, mixed_precision=run.precision))
    if run.quick:
        cfg = cfg.quick()
    return Genifer(
        model=model,
        optimizer=optimizer,
        criterion=criterion,
        feature_layer=run.feature_layer,
        config=cfg,
        image_shape=shape,
        checkpoint_dir=run.work_dir,
        train_mb_size=run.train_mb_size,
        train_epochs=run.epochs,
        eval_mb_size=run.eval_mb_size,
        device=device,
        plugins=plugins,
        evaluator=evaluator,
    )
