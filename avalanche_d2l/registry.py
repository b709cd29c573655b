"""The strategy registry's import path: :mod:`avalanche_d2l.core.registry` holds it, and
Avalanche's baselines live in :mod:`avalanche_d2l.strategies.baselines` (their configs and the
BiC shim are still importable from here)."""

from __future__ import annotations

from typing import Any

from avalanche_d2l.core.registry import (  # noqa: F401 -- the registry's names, re-exported
    _REGISTRY,
    Factory,
    RunConfig,
    StrategyInfo,
    benchmark_image_shape,
    build_strategy,
    check_keys,
    config_from_dict,
    config_to_dict,
    ensure_registered,
    get_strategy,
    register_strategy,
    strategy_names,
    unregister_strategy,
)

__all__ = [
    "RunConfig",
    "StrategyInfo",
    "register_strategy",
    "unregister_strategy",
    "get_strategy",
    "strategy_names",
    "build_strategy",
    "benchmark_image_shape",
    "check_keys",
    "config_from_dict",
]

_BASELINE_NAMES = (
    "BiCConfig",
    "DERConfig",
    "ERACEConfig",
    "EWCConfig",
    "GenerativeReplayConfig",
    "LwFConfig",
    "TorchCompatBiCPlugin",
)


def __getattr__(name: str) -> Any:
    if name in _BASELINE_NAMES:
        from avalanche_d2l.strategies import baselines

        return getattr(baselines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
