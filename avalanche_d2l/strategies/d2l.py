"""D2L's registry entries; the method lives in :mod:`avalanche_d2l.d2l` (this module is imported
by the registry's discovery and kept as an import path)."""

from ..d2l import D2L, D2LConfig, D2LPlugin, DreamConfig, DreamHeads
from ..d2l.plugin import greedy_assignment
from ..d2l.space import InputSpace, infer_input_space, load_dreamer
from ..d2l.strategy import build_d2l, build_der_d2l, build_er_ace_d2l

__all__ = [
    "D2L",
    "D2LConfig",
    "D2LPlugin",
    "DreamConfig",
    "DreamHeads",
    "InputSpace",
    "build_d2l",
    "build_der_d2l",
    "build_er_ace_d2l",
    "greedy_assignment",
    "infer_input_space",
    "load_dreamer",
]
