"""Continual-learning strategies, each registering itself with
:func:`avalanche_d2l.core.registry.register_strategy` when its module is imported: Avalanche's
baselines (:mod:`.baselines`), D2L and Genifer. The package imports this one, which imports every
module beside it, so a new method's module here is registered without editing anything else."""

import importlib
import pkgutil

from avalanche_d2l.strategies.d2l import D2L, D2LPlugin
from avalanche_d2l.strategies.genifer import Genifer, GeniferConfig, GeniferPlugin

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["D2L", "D2LPlugin", "Genifer", "GeniferConfig", "GeniferPlugin"]
