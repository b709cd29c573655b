"""Genifer (its code lives in :mod:`avalanche_d2l.genifer`); imported here so that the registry,
which imports every module of this package, finds its entry."""

from avalanche_d2l.genifer.config import GeniferConfig
from avalanche_d2l.genifer.plugin import GeniferPlugin
from avalanche_d2l.genifer.strategy import Genifer, build_genifer

__all__ = ["Genifer", "GeniferConfig", "GeniferPlugin", "build_genifer"]
