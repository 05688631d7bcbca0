"""Pure-torch reference of the projection ops: the single oracle for every kernel and fallback.

Orientation: a weight or gradient ``G`` is ``out×in`` (PyTorch's ``nn.Linear.weight``); the
input-side basis ``V`` is ``in×k_in`` and the output-side basis ``U`` is ``out×k_out``, both with
orthonormal columns. A basis flagged as a complement spans the *kept* space instead, so the
projector on that side is ``B Bᵀ`` rather than ``I − B Bᵀ`` (cheaper when the protected subspace
covers more than half of the space).
"""
from __future__ import annotations

import math

import torch

from .._checks import check_basis, check_same_device, check_tensor


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def validate_residual_project(G, U, V, scale) -> float:
    """Check the arguments of :func:`residual_project`; returns ``scale`` as a float."""
    check_tensor("G", G, min_ndim=2)
    for name, B in (("U", U), ("V", V)):
        if B is not None:
            check_tensor(name, B, ndim=2)
    check_same_device(G=G, U=U, V=V)
    if U is not None:
        check_basis("U", U, G.shape[-2], "G.shape[-2], the output size")
    if V is not None:
        check_basis("V", V, G.shape[-1], "G.shape[-1], the input size")
    return _check_scale(scale)


def validate_project_rows(X, V, scale) -> float:
    """Check the arguments of :func:`project_rows`; returns ``scale`` as a float."""
    check_tensor("X", X, min_ndim=1)
    if V is None:
        raise TypeError("V must be a basis tensor (d×k), got None")
    check_tensor("V", V, ndim=2)
    check_same_device(X=X, V=V)
    check_basis("V", V, X.shape[-1], "X.shape[-1], the feature size")
    return _check_scale(scale)


def _project_right(H: torch.Tensor, V: torch.Tensor, complement: bool) -> torch.Tensor:
    """``H (I − V Vᵀ)``, or ``H V Vᵀ`` when ``V`` spans the kept space."""
    if V.shape[1] == 0:
        return H.new_zeros(H.shape) if complement else H
    kept = (H @ V) @ V.mT
    return kept if complement else H - kept


def residual_project(G: torch.Tensor, U: torch.Tensor | None = None, V: torch.Tensor | None = None,
                     scale: float = 1.0, *, U_complement: bool = False,
                     V_complement: bool = False) -> torch.Tensor:
    """``scale · (I − U Uᵀ) G (I − V Vᵀ)`` through thin products, never a dense projector.

    G: ``(..., out, in)``; U: ``out×k_out`` or None; V: ``in×k_in`` or None; ``k = 0`` is allowed.
    Computed in ``G``'s dtype (bases are cast to it). Returns a new tensor shaped like ``G``.
    """
    scale = validate_residual_project(G, U, V, scale)
    return residual_project_unchecked(G, U, V, scale, U_complement, V_complement)


def residual_project_unchecked(G, U, V, scale: float, U_complement: bool = False,
                               V_complement: bool = False) -> torch.Tensor:
    """:func:`residual_project` for arguments that were already validated."""
    H = G
    if V is not None:
        H = _project_right(H, V.to(G.dtype), V_complement)
    if U is not None:
        H = _project_right(H.mT, U.to(G.dtype), U_complement).mT
    return H * scale if scale != 1.0 or H is G else H


def project_rows(X: torch.Tensor, V: torch.Tensor, scale: float = 1.0, *,
                 V_complement: bool = False) -> torch.Tensor:
    """``scale · (X − (X V) Vᵀ)`` for rows ``X`` of shape ``(..., d)`` and a basis ``V`` (``d×k``)."""
    scale = validate_project_rows(X, V, scale)
    return residual_project_unchecked(X, None, V, scale, V_complement=V_complement)


def low_rank_factors(G: torch.Tensor, U: torch.Tensor | None, V: torch.Tensor | None):
    """Thin ``L`` (``out×K``) and ``R`` (``K×in``) with ``(I−UUᵀ) G (I−VVᵀ) = G − L R`` for 2-D ``G``:
    V only: ``L = GV``, ``R = Vᵀ``; U only: ``L = U``, ``R = UᵀG``; both:
    ``L = [U, Q − U(UᵀQ)]``, ``R = [UᵀG; Vᵀ]`` with ``Q = GV`` (``K = k_out + k_in``)."""
    if U is None:
        return G @ V, V.mT
    if V is None:
        return U, U.mT @ G
    Q = G @ V
    return torch.cat([U, Q - U @ (U.mT @ Q)], dim=1), torch.cat([U.mT @ G, V.mT], dim=0)
