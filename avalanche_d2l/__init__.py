"""avalanche-d2l: Dream2Learn (D2L) and Genifer continual-learning strategies for Avalanche.

Public API::

    from avalanche_d2l import D2L, D2LPlugin, Genifer, GeniferPlugin, make_evaluator
    from avalanche_d2l.scenarios import split_digits
"""

from avalanche_d2l.dreaming import DreamConfig, Dreamer, DreamerConfig  # noqa: E402
from avalanche_d2l.evaluation import make_evaluator
from avalanche_d2l.models import resnet18_cifar, small_cnn
from avalanche_d2l.registry import RunConfig, register_strategy, strategy_names
from avalanche_d2l.scenarios import split_color_digits, split_digits
from avalanche_d2l.strategies import (
    D2L,
    D2LPlugin,
    DreamHeads,
    Genifer,
    GeniferConfig,
    GeniferPlugin,
)

__version__ = "0.1.0"

__all__ = [
    "D2L",
    "D2LPlugin",
    "DreamConfig",
    "DreamHeads",
    "Dreamer",
    "DreamerConfig",
    "Genifer",
    "GeniferConfig",
    "GeniferPlugin",
    "RunConfig",
    "make_evaluator",
    "register_strategy",
    "resnet18_cifar",
    "small_cnn",
    "split_color_digits",
    "split_digits",
    "strategy_names",
    "__version__",
]
