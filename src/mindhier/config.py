"""Config dataclasses: named presets, strict (de)serialisation, and a stable hash.

Every model module defines a frozen dataclass and a ``PRESETS`` dict of name -> instance.
Checkpoints store ``to_dict(cfg)`` and ``config_hash(cfg)``; loading compares them field by
field so a checkpoint never silently lands in a model of another shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, TypeVar

from mindhier.errors import MindhierError

T = TypeVar("T")


class ConfigError(MindhierError, ValueError):
    """A config that does not match what a file or a checkpoint expects."""


def to_dict(cfg: Any) -> dict:
    """Plain JSON-able dict of a (possibly nested) config dataclass; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _coerce(field_type: Any, value: Any) -> Any:
    # JSON turns tuples into lists; restore tuples so equality with presets holds.
    if isinstance(value, list):
        return tuple(_coerce(None, v) for v in value)
    return value


def from_dict(cls: type[T], data: dict) -> T:
    """Build ``cls`` from a dict, refusing unknown keys (they mean another code version)."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"{cls.__name__}: unknown config keys {unknown}; the file was written by another "
            f"version of mindhier (known keys: {sorted(names)})"
        )
    kwargs = {}
    for key, value in data.items():
        ftype = names[key].type
        if dataclasses.is_dataclass(value):
            kwargs[key] = value
        elif isinstance(value, dict) and key in _nested(cls):
            kwargs[key] = from_dict(_nested(cls)[key], value)
        else:
            kwargs[key] = _coerce(ftype, value)
    return cls(**kwargs)


def _nested(cls: type) -> dict[str, type]:
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
            if dataclasses.is_dataclass(value):
                defaults[f.name] = type(value)
        elif dataclasses.is_dataclass(f.default):
            defaults[f.name] = type(f.default)
    return defaults


def config_hash(cfg: Any) -> str:
    """Short stable hash of a config (sorted-key JSON, sha256, 12 hex digits)."""
    return dict_hash(to_dict(cfg))


def dict_hash(data: dict) -> str:
    """:func:`config_hash` of a config as stored in a checkpoint's JSON (which may predate a
    field added to the dataclass since, with its default)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def get_preset(presets: dict[str, T], name: str, what: str = "config") -> T:
    """Look a preset up by name with an error that lists the choices."""
    if name not in presets:
        raise ConfigError(f"unknown {what} preset {name!r}; choose one of {sorted(presets)}")
    return presets[name]


def diff_configs(expected: dict, found: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two config dicts (``key: expected != found``)."""
    lines = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key, "<absent>"), found.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += diff_configs(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: expected {a!r}, checkpoint has {b!r}")
    return lines
