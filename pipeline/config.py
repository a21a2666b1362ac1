"""Frozen-dataclass configuration helpers: to/from plain dicts and TOML.

Every algorithm parameter of the project lives in a frozen dataclass with a
documented default.  These helpers turn any such (possibly nested) config
into a JSON-able dict for ``run.json`` and build one back from a dict or a
TOML table, rejecting unknown keys with a message that names them.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["config_to_dict", "config_from_dict", "load_toml"]

C = TypeVar("C")


def config_to_dict(config: Any) -> Any:
    """Return a JSON-serialisable copy of a (nested) dataclass config.

    Tuples become lists, enums their values, paths strings.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    if isinstance(config, dict):
        return {str(k): config_to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    if hasattr(config, "value") and hasattr(config, "name"):  # enum
        return config.value
    return config


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        return config_from_dict(annotation, value, where=where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except (TypeError, ValueError):
                continue
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if args and len(args) == len(value):
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        return tuple(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is Path and isinstance(value, str):
        return Path(value)
    return value


def config_from_dict(cls: type[C], data: dict[str, Any] | None, *, where: str = "") -> C:
    """Build the frozen dataclass ``cls`` from a dict (e.g. a TOML table).

    Missing keys keep their documented defaults; unknown keys raise.

    Parameters
    ----------
    cls : type
        The dataclass type.
    data : dict or None
        Values to set.
    where : str
        Context for error messages (file name, table name).

    Raises
    ------
    ValueError
        If ``data`` holds keys that ``cls`` does not define.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        label = f" in {where}" if where else ""
        raise ValueError(
            f"unknown {cls.__name__} parameter(s){label}: {', '.join(unknown)}; "
            f"valid parameters are: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints.get(k, Any), f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, naming the file in any parse error."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"configuration file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
