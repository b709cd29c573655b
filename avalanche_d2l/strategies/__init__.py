"""Continual-learning strategies: one module per method (the strategy and its plugin)."""

from avalanche_d2l.strategies.genifer import Genifer, GeniferConfig, GeniferPlugin

__all__ = ["Genifer", "GeniferPlugin", "GeniferConfig"]
