"""Continual-learning strategies: one module per method (the strategy and its plugin)."""

from avalanche_d2l.strategies.genifer import Genifer, GeniferConfig, GeniferPlugin

__all__ = ["Genifer", "GeniferConfig", "GeniferPlugin"]
from avalanche_d2l.strategies.d2l import (  # noqa: E402
    D2L,
    D2LPlugin,
    DreamHeads,
    build_d2l,
    greedy_assignment,
)

__all__ += ["D2L", "D2LPlugin", "DreamHeads", "build_d2l", "greedy_assignment"]
