"""Names that ``ops/triton_kernels.py``, ``tests/test_triton_projection.py``,
``bench/test_bench_projection.py`` and ``bench/gpu_projection.py`` import from this module: the
torch backend's formulas under their old names. The float64 oracles are ``tests/oracles.py``;
nothing else in the package imports this module.
"""
from __future__ import annotations

from . import validation
from .torch_backend import residual_project as residual_project_unchecked
from .torch_backend import subspace_anchor, thin_factors  # noqa: F401


def residual_project(G, U=None, V=None, scale: float = 1.0, *, U_complement: bool = False, V_complement: bool = False):
    """``scale · (I − U Uᵀ) G (I − V Vᵀ)`` in ``G``'s dtype, validated (see :func:`residual_project_unchecked`)."""
    scale = validation.residual_project_args(G, U, V, scale)
    return residual_project_unchecked(G, U, V, scale, U_complement, V_complement)


def project_rows(X, V, scale: float = 1.0, *, V_complement: bool = False):
    scale = validation.project_rows_args(X, V, scale)
    return residual_project_unchecked(X, None, V, scale, V_complement=V_complement)


def subspace_restore(W, W0, U=None, V=None, *, U_complement: bool = False, V_complement: bool = False):
    """``W0 + (I − UUᵀ)(W − W0)(I − VVᵀ)`` as a new tensor in ``W``'s dtype."""
    W0 = W0.to(W.dtype)
    return W0 + residual_project_unchecked(W - W0, U, V, 1.0, U_complement, V_complement)


def low_rank_factors(G, U, V):
    """Thin ``L`` (``out×K``) and ``R`` (``K×in``) with ``(I−UUᵀ) G (I−VVᵀ) = G − L R`` for 2-D ``G``."""
    _, L, R = thin_factors(G, U, V)
    return L, R
