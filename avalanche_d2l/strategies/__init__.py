"""Continual-learning strategies: one module per method (config + plugin + strategy), each
registering itself with :func:`avalanche_d2l.registry.register_strategy`."""

from avalanche_d2l.strategies.d2l import D2L, D2LPlugin
from avalanche_d2l.strategies.genifer import Genifer, GeniferConfig, GeniferPlugin

__all__ = ["D2L", "D2LPlugin", "Genifer", "GeniferConfig", "GeniferPlugin"]
