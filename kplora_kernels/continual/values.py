"""Checks of single configuration values, shared by the config (:mod:`.config`) and the methods'
own options (:mod:`.methods`). Each raises ``TypeError`` (wrong kind) or ``ValueError`` (wrong value)
naming the field, what was expected and what was found."""
from __future__ import annotations

import math

EPS_RANGE = {"gt": 0, "le": 1}  # an energy threshold: a fraction of ‖·‖_F² in (0, 1]


def number(name: str, value, *, integer: bool = False) -> float | int:
    """``value`` as an int (``integer``) or a float; bools, strings and non-finite numbers are refused."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value if integer else float(value)


def eps(name: str, value) -> float:
    """An energy threshold (ε_w, ε_f, ε_w_out: a fraction of ``‖·‖_F²``): a finite number in (0, 1]."""
    value = number(name, value)
    if not EPS_RANGE["gt"] < value <= EPS_RANGE["le"]:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def at_least(name: str, value, low: float, *, integer: bool = False) -> float | int:
    """``value`` as an int (``integer``) or a float, checked to be ≥ ``low``.

    Raises:
        TypeError: ``value`` is not an int (``integer``) or a number; bools and strings are refused.
        ValueError: ``value`` is not finite, or is below ``low``.
    """
    value = number(name, value, integer=integer)
    if value < low:
        raise ValueError(f"{name} must be ≥ {low}, got {value}")
    return value
