"""Genifer: generative feature-driven image replay (Thandiackal et al., IVC 2024).

Read in this order: :mod:`~avalanche_d2l.genifer.plugin` (the method's hooks in run order),
:mod:`~avalanche_d2l.models.feature_gan` (one GAN phase), :mod:`~avalanche_d2l.genifer.monitor`
and :mod:`~avalanche_d2l.genifer.fidelity` (how the replay is checked against real images),
:mod:`~avalanche_d2l.genifer.config` (every setting, in five parts),
:mod:`~avalanche_d2l.genifer.strategy`. Plumbing: :mod:`~avalanche_d2l.genifer.replay` (replayed
mini-batches), :mod:`~avalanche_d2l.genifer.losses`, :mod:`~avalanche_d2l.genifer.parts` (models
fitted to the data, the output head), :mod:`~avalanche_d2l.genifer.state`.
"""

from avalanche_d2l.genifer.config import (
    AugmentSettings,
    DiscriminatorSettings,
    GanSettings,
    GeneratorSettings,
    GeniferConfig,
    ReplaySettings,
)
from avalanche_d2l.genifer.fidelity import (
    Fidelity,
    ProbeSettings,
    classifier_accuracy,
    diversity_ratio,
    measure_fidelity,
    probe_accuracy,
    separability,
)
from avalanche_d2l.genifer.plugin import GeniferPlugin
from avalanche_d2l.genifer.strategy import Genifer, build_genifer

__all__ = [
    "AugmentSettings",
    "DiscriminatorSettings",
    "Fidelity",
    "GanSettings",
    "GeneratorSettings",
    "Genifer",
    "GeniferConfig",
    "GeniferPlugin",
    "ProbeSettings",
    "ReplaySettings",
    "build_genifer",
    "classifier_accuracy",
    "diversity_ratio",
    "measure_fidelity",
    "probe_accuracy",
    "separability",
]
