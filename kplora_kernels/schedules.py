"""Layer scaling: the factor ``s_l`` that multiplies the adapter branch of layer ``l``."""
from __future__ import annotations

import math

SCHEDULES = ("linear", "constant", "cosine", "exponential")


def layer_scales(num_layers: int, gamma: float = 0.2, schedule: str = "linear") -> list[float]:
    """Per-layer factors for layers ``0 … L−1``, from ``gamma`` at the first layer to 1 at the last.

    ``linear`` (KeepLoRA++): ``γ + (1 − γ)·l/(L − 1)``; ``constant`` (plain KeepLoRA): all 1;
    ``cosine``: ``γ + (1 − γ)·(1 − cos(π·l/(L − 1)))/2``; ``exponential``: ``γ^(1 − l/(L − 1))``.
    A single layer gets ``[1.0]``.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an int ≥ 1, got {num_layers!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be a float in (0, 1], got {gamma!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if num_layers == 1 or schedule == "constant":
        return [1.0] * num_layers
    depth = [l / (num_layers - 1) for l in range(num_layers)]
    if schedule == "linear":
        return [gamma + (1.0 - gamma) * t for t in depth]
    if schedule == "cosine":
        return [gamma + (1.0 - gamma) * (1.0 - math.cos(math.pi * t)) / 2.0 for t in depth]
    return [gamma ** (1.0 - t) for t in depth]
