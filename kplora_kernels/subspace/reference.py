"""The per-batch-projected formulation of the sketches: the test oracle, not a code path.

This is how the sketches were computed before the projections were moved out of the sums
(``docs/design.md`` §1, "Projections commute out of the sums"): every batch's ``X`` is projected
against ``V`` and every ``dY`` against ``U`` before its products are accumulated. The streaming
sketches of :mod:`kplora_kernels.subspace.sketch` must equal these sums to rounding (tested in
float64). Orientation: ``X`` is ``tokens×in``, ``dY`` is ``tokens×out``, ``U`` is ``out×k_out``,
``V`` is ``in×k_in`` (with ``complement=True``: an orthonormal basis of the residual space).
"""
from __future__ import annotations

import torch


def project_rows(X: torch.Tensor, V: torch.Tensor | None, complement: bool = False) -> torch.Tensor:
    """``X (I − VVᵀ)`` (``X VVᵀ`` for a complement basis; ``X`` without ``V``) in ``X``'s dtype."""
    if V is None:
        return X
    Vx = V.to(X.dtype)
    kept = (X @ Vx) @ Vx.mT
    return kept if complement else X - kept


def gradient_sum(batches, U=None, V=None, V_complement: bool = False) -> torch.Tensor:
    """``Σ_b (dY_b (I−UUᵀ))ᵀ (X_b (I−VVᵀ))`` (``out×in``) for ``batches`` of ``(dY, X)``."""
    return sum(project_rows(dY, U).mT @ project_rows(X, V, V_complement) for dY, X in batches)


def gradient_sketch(batches, omega: torch.Tensor, psi: torch.Tensor, U=None, V=None, V_complement: bool = False):
    """``(Σ dŶ_bᵀ (X̂_b Ω), Σ (dŶ_b Ψᵀ)ᵀ X̂_b)``: the two-sided sketch ``(ĜΩ, ΨĜ)`` with the raw
    test matrices ``Ω`` (``in×k``) and ``Ψ`` (``l×out``), every batch projected first."""
    Y = W = 0
    for dY, X in batches:
        dYh, Xh = project_rows(dY, U), project_rows(X, V, V_complement)
        Y = Y + dYh.mT @ (Xh @ omega)
        W = W + (dYh @ psi.mT).mT @ Xh
    return Y, W


def input_covariance(batches) -> torch.Tensor:
    """``Σ X_bᵀ X_b`` (``in×in``)."""
    return sum(X.mT @ X for X in batches)


def input_sketch(batches, omega: torch.Tensor, V=None, V_complement: bool = False):
    """``(Σ X̂_bᵀ (X̂_b Ω), Σ ‖X_b‖², Σ ‖X̂_b‖²)``: the residual Nyström sketch with the raw ``Ω``
    (``in×w``), the total and the residual energies."""
    S, total, residual = 0, 0.0, 0.0
    for X in batches:
        Xh = project_rows(X, V, V_complement)
        S = S + Xh.mT @ (Xh @ omega)
        total += float(X.pow(2).sum())
        residual += float(Xh.pow(2).sum())
    return S, total, residual
