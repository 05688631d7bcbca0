"""Reading a command's settings dataclass from a JSON or YAML file, with clear one-line errors."""
from __future__ import annotations

import dataclasses
import json
import os


class ConfigError(ValueError):
    """A user error (bad config, missing file): reported in one line, no traceback."""


def load_settings(cls, path: str | None, **overrides):
    """``cls(**file settings, **overrides)``; unknown keys, unreadable files and wrong types are
    :class:`ConfigError`. Overrides that are None are ignored."""
    data = {}
    if path is not None:
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
        except Exception as exc:
            raise ConfigError(f"cannot parse {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config keys in {path}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"bad settings in {path}: {exc}") from None
