"""The settings of the ``kplora`` commands, checked in one place before any data or model is loaded.

Each command's settings are a dataclass whose fields are declared with :func:`setting`: a default,
a one-line help, and the allowed range or choices. :func:`load_settings` reads a JSON or YAML file,
refuses unknown keys, checks every value's type and range (:func:`check_settings`), then the
dataclass's own ``check()`` for rules that tie several keys together. Every problem is a
:class:`ConfigError`: one line naming the key, what was expected and what was found; the command
line prints it without a traceback and exits with status 2. :func:`describe_settings` renders the
same declarations as the key table of ``kplora <command> --help``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import types
import typing


class ConfigError(ValueError):
    """A user error (bad config, missing file or package): reported in one line, no traceback."""


def setting(default=dataclasses.MISSING, help: str = "", *, default_factory=dataclasses.MISSING,
            ge=None, gt=None, le=None, lt=None, choices=None, affects_results: bool = True):
    """A dataclass field of a command's settings. ``ge``/``gt``/``le``/``lt`` bound a number,
    ``choices`` lists the allowed values (for a list: of each element). ``affects_results=False``
    marks a setting that cannot change a run's results (a resumed run may change it)."""
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices,
                "affects_results": affects_results}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list or tp is list:
        args = typing.get_args(tp)
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], args[0])}" if args else "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _range_text(meta: dict) -> str:
    low = f"≥ {meta['ge']}" if meta["ge"] is not None else f"> {meta['gt']}" if meta["gt"] is not None else None
    high = f"≤ {meta['le']}" if meta["le"] is not None else f"< {meta['lt']}" if meta["lt"] is not None else None
    if low and high and meta["ge"] is None and meta["gt"] is not None and meta["le"] is not None:
        return f"in ({meta['gt']}, {meta['le']}]"
    return " and ".join(t for t in (low, high) if t)


def expected_text(tp, meta: dict) -> str:
    """What a value of this field must be, in words (used in errors and in ``--help``)."""
    if meta.get("choices"):
        choices = ", ".join(repr(c) for c in meta["choices"])
        base = typing.get_origin(tp) is list or tp is list
        return f"a list of any of {choices}" if base else f"one of {choices}"
    text = _type_name(tp)
    bounds = _range_text(meta)
    text = f"{text} {bounds}" if bounds else text
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
    return f"{text} or null" if optional else text


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin is list or tp is list:
        args = typing.get_args(tp)
        return isinstance(value, list) and (not args or all(_type_ok(v, args[0]) for v in value))
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


def _in_range(value, meta: dict) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return True
    return ((meta["ge"] is None or value >= meta["ge"]) and (meta["gt"] is None or value > meta["gt"])
            and (meta["le"] is None or value <= meta["le"]) and (meta["lt"] is None or value < meta["lt"]))


def check_settings(cls, data: dict, source: str = "settings") -> None:
    """Check the type, range and choices of each key of ``data`` against ``cls``'s fields; the
    first wrong one is a :class:`ConfigError` naming ``source``, the key, the expected and the
    actual value. Keys that are not fields are left to the caller."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, tp, meta = data[f.name], hints[f.name], {"ge": None, "gt": None, "le": None, "lt": None,
                                                          "choices": None, **f.metadata}
        ok = _type_ok(value, tp) and _in_range(value, meta)
        if ok and meta["choices"] is not None:
            values = value if isinstance(value, list) else [value]
            ok = all(v in meta["choices"] for v in values)
        if not ok:
            hint = ""
            if isinstance(value, str) and (_type_ok(0, tp) or _type_ok(0.0, tp)):
                try:
                    float(value)
                    hint = " (a string: write numbers without quotes; YAML reads 1e-3 as text, write 1.0e-3)"
                except ValueError:
                    pass
            raise ConfigError(f"{source}: {f.name} must be {expected_text(tp, meta)}, got {value!r}{hint}")


def read_mapping(path: str) -> dict:
    """The mapping held by a JSON or YAML (``.yaml``/``.yml``) file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except ImportError:
        raise ConfigError(f"reading {path} needs PyYAML: pip install pyyaml (or give a JSON file)") from None
    except Exception as exc:
        raise ConfigError(f"cannot parse {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def load_settings(cls, path: str | None, **overrides):
    """``cls(**file settings, **overrides)``, every value checked (:func:`check_settings`), then
    ``check()`` when ``cls`` has one. Overrides that are None are ignored."""
    data = read_mapping(path) if path is not None else {}
    source = path or "settings"
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config keys in {source}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    data.update({k: v for k, v in overrides.items() if v is not None})
    check_settings(cls, data, source)
    config = cls(**data)
    if hasattr(config, "check"):
        config.check()
    return config


def result_settings(config) -> dict:
    """The settings of ``config`` that can change a run's results (what a resumed run must match)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.metadata.get("affects_results", True)}


def describe_settings(cls) -> str:
    """A table of ``cls``'s keys (type and range, default, help) for ``--help``."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        meta = {"ge": None, "gt": None, "le": None, "lt": None, "choices": None, **f.metadata}
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        note = "" if meta.get("affects_results", True) else " (may change when resuming)"
        lines.append(f"  {f.name} = {json.dumps(default)}: {meta.get('help', '')}{note} "
                     f"[{expected_text(hints[f.name], meta)}]")
    return "\n".join(lines)


def require_packages(command: str, modules: dict, extra: str) -> None:
    """Every module of ``modules`` (import name → pip name) must be installed; the missing ones are
    one :class:`ConfigError`, raised before any work starts."""
    missing = [pip for module, pip in modules.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"kplora {command} needs {', '.join(missing)}: pip install {' '.join(missing)} "
                          f"(or pip install 'kplora_kernels[{extra}]')")
