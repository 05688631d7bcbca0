"""kplora_kernels: fused kernels and tools for KeepLoRA++ continual learning.

Orientation everywhere: a weight ``W`` (and its gradient ``G``) is ``out×in``; input-side bases
``V`` are ``in×k``; output-side bases ``U`` are ``out×k``.
"""
from ._checks import set_orthonormality_check
from .ops import project_rows, residual_project
from .schedules import layer_scales
from .subspace import LinearOperator, energy_rank, gpm_expand, principal_subspace, randomized_svd

__version__ = "0.1.0"

__all__ = [
    "FusedKeepLoRALinear", "KeepLoRA", "KeepLoRAConfig", "LinearOperator", "energy_rank", "gpm_expand",
    "layer_scales", "principal_subspace", "project_rows", "randomized_svd", "residual_project",
    "set_orthonormality_check",
]

_LAZY = {"KeepLoRA": "continual", "KeepLoRAConfig": "continual", "FusedKeepLoRALinear": "nn"}


def __getattr__(name):
    """``kplora_kernels.KeepLoRA``, ``KeepLoRAConfig`` and ``FusedKeepLoRALinear``, imported on first use
    (the kernels alone do not pull in the continual-learning engine)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
