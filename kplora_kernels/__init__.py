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
    "LinearOperator", "energy_rank", "gpm_expand", "layer_scales", "principal_subspace",
    "project_rows", "randomized_svd", "residual_project", "set_orthonormality_check",
]
