"""Avalanche's built-in strategies, registered with typed configs of their hyper-parameters
(so every run records them). Imported by :mod:`avalanche_d2l.strategies`, which registers them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from avalanche.training.plugins.bic import BiCPlugin

from avalanche_d2l.core.config import ConfigBase
from avalanche_d2l.core.registry import RunConfig, benchmark_image_shape, register_strategy

__all__ = [
    "BiCConfig",
    "DERConfig",
    "ERACEConfig",
    "EWCConfig",
    "GenerativeReplayConfig",
    "LwFConfig",
    "TorchCompatBiCPlugin",
]


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
class LwFConfig(ConfigBase):
    """Avalanche ``LwF``: distillation weight and temperature."""

    alpha: float = 1.0
    temperature: float = 2.0


@dataclass
class EWCConfig(ConfigBase):
    """Avalanche ``EWC``: penalty weight and mode."""

    ewc_lambda: float = 100.0
    mode: str = "separate"


@dataclass
class DERConfig(ConfigBase):
    """Avalanche ``DER`` (DER++): logit-distillation weight ``alpha``, replay CE weight ``beta``."""

    alpha: float = 0.1
    beta: float = 0.5


@dataclass
class ERACEConfig(ConfigBase):
    """Avalanche ``ER_ACE``: buffer minibatch size (``None``: the training minibatch size)."""

    batch_size_mem: int | None = None


@dataclass
class BiCConfig(ConfigBase):
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
class GenerativeReplayConfig(ConfigBase):
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
