"""Typed values from JSON: each key checked against its dataclass annotation, with its path.

JSON lets a file say ``"epochs": 1.9``, ``"seeds": "12"`` or ``"lr": 1e309`` (infinite); Python's
``int()``/``float()`` would quietly accept or mangle them. :func:`typed_fields` turns a JSON object
into keyword arguments of a dataclass, refusing every value that is not of the annotated type with
one sentence that names the key's path (``training.optimizer.epochs must be a whole number, got
1.9``). It knows the annotations the project's configs use: ``int``, ``float``, ``bool``, ``str``,
``X | None``, ``tuple[T, ...]``, ``list[T]`` and ``dict``; other annotations (nested configs, which
check themselves) pass through unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

__all__ = ["check_value", "typed_fields"]

_NAMES = {int: "a whole number", float: "a finite number", bool: "true or false", str: "a string"}


def _type_name(value: Any) -> str:
    return {str: "a string", list: "a list", dict: "an object", bool: "a boolean"}.get(
        type(value), repr(value)
    )


def _scalar(value: Any, kind: type, where: str) -> Any:
    wrong = ValueError(f"{where} must be {_NAMES[kind]}, got {value!r}")
    if kind is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if kind is str:
        if not isinstance(value, str):
            raise wrong
        return value
    # numbers: booleans and strings are not numbers, even where Python would convert them
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise wrong
    if not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise wrong
        return int(value)
    return float(value)


def check_value(value: Any, annotation: Any, where: str) -> Any:
    """``value`` as ``annotation`` (a JSON list as a tuple), or one sentence naming ``where``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return check_value(value, inner[0], where)
        return value  # a union of several types: the config checks it itself
    if annotation in _NAMES:
        return _scalar(value, annotation, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {_type_name(value)}")
        item = args[0] if args else Any
        items = [check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be an object, got {_type_name(value)}")
        return value
    return value


def typed_fields(cls: type, section: dict[str, Any], where: str) -> dict[str, Any]:
    """Keyword arguments of dataclass ``cls`` from ``section`` (keys already checked), each
    value checked against its annotation; ``where`` is the section's path in the file."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in section.items():
        path = f"{where}.{key}" if where else key
        out[key] = check_value(value, hints[key], path) if key in names else value
    return out
