"""The float64 oracles of the ops and of the streaming sketches: what each computes, written as plainly
as torch allows.

Called with float64 inputs they are the reference every backend is measured against; called in a
lower dtype they give the error a user would get writing the formula in that dtype, which scales
the tolerances (docs/design.md §3). Production code never imports this module.

Orientation: ``G`` is ``out×in``; ``U`` is ``out×k_out``, ``V`` is ``in×k_in`` (orthonormal columns).
A basis flagged as a complement spans the *kept* space, so its projector is ``B Bᵀ``, not ``I − B Bᵀ``.
The sketch oracles take ``batches`` of ``X`` (``tokens×in``) or of ``(dY, X)`` (``dY``: ``tokens×out``)
and project every batch before accumulating it, the plain form of the sums that the streaming sketches
of :mod:`kplora_kernels.subspace.sketch` compute with the projections moved out (``docs/design.md`` §1).
"""
from __future__ import annotations

import torch


def _right(H, V, complement):
    """``H (I − V Vᵀ)``, or ``H V Vᵀ`` for a complement ``V``."""
    if V.shape[1] == 0:
        return torch.zeros_like(H) if complement else H
    kept = (H @ V) @ V.mT
    return kept if complement else H - kept


def residual_project_unchecked(G, U=None, V=None, scale=1.0, U_complement=False, V_complement=False):
    """``scale · (I − U Uᵀ) G (I − V Vᵀ)`` in ``G``'s dtype (bases cast to it); a new tensor."""
    H = G
    if V is not None:
        H = _right(H, V.to(G.dtype), V_complement)
    if U is not None:
        H = _right(H.mT, U.to(G.dtype), U_complement).mT
    return (H * scale) if scale != 1.0 else H.clone()


def residual_project(G, U=None, V=None, scale=1.0, *, U_complement=False, V_complement=False):
    return residual_project_unchecked(G, U, V, scale, U_complement, V_complement)


def project_rows(X, V, scale=1.0, *, V_complement=False):
    """``scale · (X − (X V) Vᵀ)`` (``scale·(XV)Vᵀ`` for a complement ``V``) for rows ``X`` ``(..., d)``."""
    return residual_project_unchecked(X, None, V, scale, V_complement=V_complement)


def residual_project_grouped(Gs, Us, Vs, scales, *, U_complement=False, V_complement=False) -> list:
    """A list of new tensors ``scales[i]·(I − Us[i] Us[i]ᵀ) Gs[i] (I − Vs[i] Vs[i]ᵀ)``; ``Us``/``Vs``
    may be None, ``scales`` and the flags one value for all."""
    n = len(Gs)
    Us = [None] * n if Us is None else list(Us)
    Vs = [None] * n if Vs is None else list(Vs)
    scales = [scales] * n if isinstance(scales, (int, float)) else list(scales)
    Uc = [U_complement] * n if isinstance(U_complement, bool) else list(U_complement)
    Vc = [V_complement] * n if isinstance(V_complement, bool) else list(V_complement)
    return [residual_project_unchecked(G, U, V, s, uc, vc) for G, U, V, s, uc, vc in zip(Gs, Us, Vs, scales, Uc, Vc)]


def subspace_anchor(W0, U, V):
    """``(W0 V, Uᵀ W0)`` (None for an absent basis) in ``W0``'s dtype, float32 for half precision."""
    dt = torch.float32 if W0.dtype in (torch.float16, torch.bfloat16) else W0.dtype
    W = W0.to(dt)
    return (None if V is None else W @ V.to(dt)), (None if U is None else U.to(dt).mT @ W)


def subspace_restore(W, W0, U=None, V=None, *, U_complement=False, V_complement=False):
    """``W0 + (I − UUᵀ)(W − W0)(I − VVᵀ)`` as a new tensor in ``W``'s dtype."""
    W0 = W0.to(W.dtype)
    return W0 + residual_project_unchecked(W - W0, U, V, 1.0, U_complement, V_complement)


def sketch_update(A, B, M1, M2=None):
    """``(Aᵀ(B M1), Bᵀ(A M2) or None, ‖B M1‖² + ‖A M2‖²)`` in float64."""
    A, B, M1 = A.double(), B.double(), M1.double()
    P = B @ M1
    probe = P.square().sum()
    if M2 is None:
        return A.mT @ P, None, probe
    Q = A @ M2.double()
    return A.mT @ P, B.mT @ Q, probe + Q.square().sum()


def gradient_sum(batches, U=None, V=None, V_complement=False):
    """``Σ_b (dY_b (I−UUᵀ))ᵀ (X_b (I−VVᵀ))`` (``out×in``) for ``batches`` of ``(dY, X)``."""
    return sum(project_rows(dY, U).mT @ project_rows(X, V, V_complement=V_complement) for dY, X in batches)


def gradient_sketch(batches, omega, psi, U=None, V=None, V_complement=False):
    """``(Σ dŶ_bᵀ (X̂_b Ω), Σ (dŶ_b Ψᵀ)ᵀ X̂_b)``: the two-sided sketch ``(ĜΩ, ΨĜ)`` with the raw
    test matrices ``Ω`` (``in×k``) and ``Ψ`` (``l×out``), every batch projected first."""
    Y = W = 0
    for dY, X in batches:
        dYh, Xh = project_rows(dY, U), project_rows(X, V, V_complement=V_complement)
        Y = Y + dYh.mT @ (Xh @ omega)
        W = W + (dYh @ psi.mT).mT @ Xh
    return Y, W


def input_covariance(batches):
    """``Σ X_bᵀ X_b`` (``in×in``)."""
    return sum(X.mT @ X for X in batches)


def input_sketch(batches, omega, V=None, V_complement=False):
    """``(Σ X̂_bᵀ (X̂_b Ω), Σ ‖X_b‖², Σ ‖X̂_b‖²)``: the residual Nyström sketch with the raw ``Ω``
    (``in×w``), the total and the residual energies (Python floats)."""
    S, total, residual = 0, 0.0, 0.0
    for X in batches:
        Xh = project_rows(X, V, V_complement=V_complement)
        S = S + Xh.mT @ (Xh @ omega)
        total += float(X.pow(2).sum())
        residual += float(Xh.pow(2).sum())
    return S, total, residual
