"""Continual-learning strategies, each registering itself with
:func:`avalanche_d2l.core.registry.register_strategy` when imported: Avalanche's baselines
(:mod:`.baselines`), D2L and Genifer. The package imports this module, so every strategy is
registered once ``avalanche_d2l`` is imported."""

from avalanche_d2l.strategies import baselines  # noqa: F401 -- registers Avalanche's strategies
from avalanche_d2l.strategies.d2l import D2L, D2LPlugin
from avalanche_d2l.strategies.genifer import Genifer, GeniferConfig, GeniferPlugin

__all__ = ["D2L", "D2LPlugin", "Genifer", "GeniferConfig", "GeniferPlugin"]
