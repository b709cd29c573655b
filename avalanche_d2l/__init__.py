"""avalanche-d2l: Dream2Learn (D2L) and Genifer continual-learning strategies for Avalanche.

Public API::

    from avalanche_d2l import D2L, D2LPlugin, Genifer, GeniferPlugin, make_evaluator
    from avalanche_d2l import reuse_freed_memory
    from avalanche_d2l.scenarios import split_digits

    reuse_freed_memory()  # on CPU under Linux: fewer page faults, same numbers

Experiments (the engine behind ``avalanche-d2l run`` and ``compare``)::

    from avalanche_d2l.experiments import load_experiment, run_experiment
"""

import warnings

# Avalanche imports qpsolvers (for GEM) at import time, which warns on every start that no solver
# is installed; no strategy of this package uses it.
warnings.filterwarnings("ignore", message="no QP solver found")

from avalanche_d2l import strategies  # noqa: E402, F401 -- every strategy registers itself
from avalanche_d2l.core.allocator import reuse_freed_memory  # noqa: E402
from avalanche_d2l.d2l import D2L, D2LConfig, D2LPlugin, DreamConfig, DreamHeads  # noqa: E402
from avalanche_d2l.dreaming import Dreamer, DreamerConfig  # noqa: E402
from avalanche_d2l.evaluation import final_metrics, make_evaluator  # noqa: E402
from avalanche_d2l.genifer import Genifer, GeniferConfig, GeniferPlugin  # noqa: E402
from avalanche_d2l.models import resnet18_cifar, small_cnn  # noqa: E402
from avalanche_d2l.registry import RunConfig, register_strategy, strategy_names  # noqa: E402
from avalanche_d2l.scenarios import split_color_digits, split_digits  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "D2L",
    "D2LConfig",
    "D2LPlugin",
    "DreamConfig",
    "DreamHeads",
    "Dreamer",
    "DreamerConfig",
    "Genifer",
    "GeniferConfig",
    "GeniferPlugin",
    "RunConfig",
    "final_metrics",
    "make_evaluator",
    "register_strategy",
    "resnet18_cifar",
    "reuse_freed_memory",
    "small_cnn",
    "split_color_digits",
    "split_digits",
    "strategy_names",
    "__version__",
]
