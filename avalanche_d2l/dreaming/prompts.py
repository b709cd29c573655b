"""Former home of D2L's dreaming settings; :class:`DreamConfig` now lives in
:mod:`avalanche_d2l.d2l.config` (this import path is kept for existing scripts)."""


def __getattr__(name: str):
    if name == "DreamConfig":  # resolved lazily: the method layer sits above this package
        from ..d2l.config import DreamConfig

        return DreamConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
