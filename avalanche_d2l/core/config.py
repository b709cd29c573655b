"""The base of the package's typed ``@dataclass`` configs: dict round trip, unknown keys refused,
fingerprint.

A config subclasses :class:`ConfigBase` and stays a plain dataclass::

    @dataclass
    class LwFConfig(ConfigBase):
        alpha: float = 1.0
        temperature: float = 2.0

    LwFConfig.from_dict({"alpha": 0.5}).to_dict()   # {"alpha": 0.5, "temperature": 2.0}
    LwFConfig.from_dict({"alpah": 0.5})             # ValueError naming 'alpah' and the valid keys

What a class changes is said by class attributes (no annotation, so they are not fields):
fields left out of the dict or the fingerprint, and how its fingerprint is hashed. The hash styles
differ between classes because run records, dream caches and saved dreamers already hold
fingerprints of each style; changing one would make every recorded run look changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = [
    "ConfigBase",
    "check_config_keys",
    "check_keys",
    "dataclass_from_dict",
    "merge_sections",
    "plain",
]


def plain(value: Any) -> Any:
    """``value`` as JSON would give it back: nested configs as dicts, tuples as lists."""
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return type(value)((k, plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def check_keys(section: Any, allowed: set[str], where: str) -> dict:
    """``section`` as a dict; unknown keys are an error listing the valid ones (the one
    unknown-key message of every config and experiment-file section)."""
    if not isinstance(section, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(section).__name__}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(allowed)}")
    return section


def check_config_keys(cls: type, data: Any, *, where: str | None = None) -> dict[str, Any]:
    """The keys of ``data`` that are fields of dataclass ``cls``.

    Args:
        cls: the config class.
        data: a dict (an experiment file's section).
        where: the section's path in the file (``"the settings of lwf"``); the message names
            the class when ``None``.

    Raises:
        ValueError: ``data`` is not a dict, or holds a key that is not a field (one sentence
            naming the key and listing the valid ones).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    if where:
        return dict(check_keys(data, names, where))
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(names)}")
    return {k: v for k, v in data.items() if k in names}


def _is_tuple(annotation: Any) -> bool:
    if typing.get_origin(annotation) is tuple:
        return True
    return any(_is_tuple(a) for a in typing.get_args(annotation) if a is not type(None))


def dataclass_from_dict(
    cls: type,
    data: Any,
    *,
    where: str | None = None,
    typed: bool = True,
):
    """``cls(**data)`` for a dataclass ``cls``, keys checked by :func:`check_config_keys`.

    ``typed``: each value checked against its annotation
    (:func:`avalanche_d2l.fields.typed_fields`); otherwise only JSON lists become tuples where
    the annotation is a tuple.
    """
    kwargs = check_config_keys(cls, data, where=where)
    if typed:
        from avalanche_d2l.fields import typed_fields

        kwargs = typed_fields(cls, kwargs, where or cls.__name__)
    else:
        hints = typing.get_type_hints(cls)
        kwargs = {
            k: tuple(v) if isinstance(v, list) and _is_tuple(hints.get(k)) else v
            for k, v in kwargs.items()
        }
    return cls(**kwargs)


class ConfigBase:
    """Mixin of a typed dataclass config: :meth:`to_dict`, :meth:`from_dict`, :meth:`fingerprint`.

    Class attributes (set without an annotation in a subclass):

    * ``not_saved``: fields never in :meth:`to_dict` (filled at run time);
    * ``omitted_at_default``: ``{field: default}`` left out of :meth:`to_dict` while the field
      holds that value (fields added after records were written keep those records' hashes);
    * ``not_fingerprinted``: dotted paths into :meth:`to_dict` that do not change results;
    * ``fingerprint_hash``, ``fingerprint_chars``, ``fingerprint_compact``: hashlib algorithm,
      hex characters kept (``None``: all), JSON without spaces;
    * ``checks_types`` (default ``True``): :meth:`from_dict` checks each value against its
      annotation (:func:`avalanche_d2l.fields.typed_fields`: ``1`` for a float becomes ``1.0``);
      ``False`` keeps values as given (only JSON lists become tuples where annotated so).
    """

    not_saved: ClassVar[tuple[str, ...]] = ()
    omitted_at_default: ClassVar[Mapping[str, Any]] = {}
    not_fingerprinted: ClassVar[tuple[str, ...]] = ()
    fingerprint_hash: ClassVar[str] = "sha1"
    fingerprint_chars: ClassVar[int | None] = 16
    fingerprint_compact: ClassVar[bool] = False
    checks_types: ClassVar[bool] = True

    def to_dict(self) -> dict[str, Any]:
        """Every saved field, JSON-shaped (nested configs as dicts, tuples as lists);
        :meth:`from_dict` gives back an equal config."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in self.not_saved:
                continue
            if f.name in self.omitted_at_default and value == self.omitted_at_default[f.name]:
                continue
            out[f.name] = plain(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str | None = None):
        """The config from a dict (an experiment file's section; missing keys keep their
        defaults).

        Raises:
            ValueError: a key that is not a field (naming it and the valid ones), or, with
                ``checks_types``, a value of the wrong type (naming its path).
        """
        return dataclass_from_dict(cls, data, where=where, typed=cls.checks_types)

    def fingerprint(self) -> str:
        """Hash of :meth:`to_dict` without the ``not_fingerprinted`` paths."""
        d = self.to_dict()
        for path in self.not_fingerprinted:
            *parents, leaf = path.split(".")
            node = d
            for key in parents:
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(leaf, None)
        separators = (",", ":") if self.fingerprint_compact else None
        blob = json.dumps(d, sort_keys=True, default=str, separators=separators)
        digest = hashlib.new(self.fingerprint_hash, blob.encode()).hexdigest()
        return digest[: self.fingerprint_chars] if self.fingerprint_chars else digest


def merge_sections(base: Mapping[str, Any], change: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``change`` written over it part by part (``{"gan": {"steps": 3}}`` changes
    one setting of ``gan`` and keeps the others)."""
    out = dict(base)
    for key, value in change.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_sections(out[key], value)
        else:
            out[key] = value
    return out
