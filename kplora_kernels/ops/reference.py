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
    """:func:`residual_project` for arguments that were already validated. Always a new tensor,
    never ``G`` or a view of it (also when both bases are absent or empty and ``scale`` is 1)."""
    H = G
    fresh = False  # whether H is a new tensor (an empty non-complement basis leaves G as it is)
    if V is not None:
        H = _project_right(H, V.to(G.dtype), V_complement)
        fresh = fresh or V_complement or V.shape[1] > 0
    if U is not None:
        H = _project_right(H.mT, U.to(G.dtype), U_complement).mT
        fresh = fresh or U_complement or U.shape[1] > 0
    if scale != 1.0:
        return H * scale
    return H if fresh else H.clone()


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


# --- grouped projection and the constraint restore of full fine-tuning (docs/design.md §1) -------

def residual_project_grouped(Gs, Us, Vs, scales, *, U_complement=False, V_complement=False) -> list:
    """Oracle of :func:`kplora_kernels.ops.residual_project_grouped_`: a list of new tensors
    ``scales[i]·(I − Us[i] Us[i]ᵀ) Gs[i] (I − Vs[i] Vs[i]ᵀ)``. ``Us``/``Vs`` may be None (no basis on
    that side for any entry); ``scales`` and the complement flags may be one value for all."""
    n = len(Gs)
    Us = [None] * n if Us is None else list(Us)
    Vs = [None] * n if Vs is None else list(Vs)
    scales = [scales] * n if isinstance(scales, (int, float)) else list(scales)
    Uc = [U_complement] * n if isinstance(U_complement, bool) else list(U_complement)
    Vc = [V_complement] * n if isinstance(V_complement, bool) else list(V_complement)
    return [residual_project(G, U, V, s, U_complement=uc, V_complement=vc)
            for G, U, V, s, uc, vc in zip(Gs, Us, Vs, scales, Uc, Vc)]


def subspace_anchor(W0: torch.Tensor, U: torch.Tensor | None, V: torch.Tensor | None):
    """The thin products of the task-start weight that the constraint restore needs instead of
    ``W0``: ``(W0 V, Uᵀ W0)`` (``out×k_in`` and ``k_out×in``; None for an absent basis), in the dtype
    of ``W0`` (bases cast to it), or in float32 for a half-precision ``W0``."""
    dt = torch.float32 if W0.dtype in (torch.float16, torch.bfloat16) else W0.dtype
    W = W0.to(dt)
    W0V = None if V is None else W @ V.to(dt)
    UtW0 = None if U is None else U.to(dt).mT @ W
    return W0V, UtW0


def subspace_restore(W: torch.Tensor, W0: torch.Tensor, U: torch.Tensor | None = None,
                     V: torch.Tensor | None = None, *, U_complement: bool = False,
                     V_complement: bool = False) -> torch.Tensor:
    """Oracle of the post-step constraint restore: ``W0 + (I − UUᵀ)(W − W0)(I − VVᵀ)`` as a new
    tensor, computed in ``W``'s dtype. Afterwards ``(W − W0) V = 0`` and ``Uᵀ (W − W0) = 0``."""
    return W0.to(W.dtype) + residual_project(W - W0.to(W.dtype), U, V, 1.0, U_complement=U_complement,
                                             V_complement=V_complement)


def thin_factors(G: torch.Tensor, U: torch.Tensor | None, V: torch.Tensor | None, *,
                 U_complement: bool = False, V_complement: bool = False,
                 GV0: torch.Tensor | None = None, UtG0: torch.Tensor | None = None,
                 UtD: torch.Tensor | None = None):
    """``(keep, L, R)`` with ``(I − UUᵀ) D (I − VVᵀ) = keep·D − L R`` for the 2-D ``D = G − G0``,
    from thin products only: ``L`` is ``out×K``, ``R`` is ``K×in``, ``keep`` is 1 or 0.

    ``GV0 = G0 V`` and ``UtG0 = Uᵀ G0`` are the offsets of the constraint restore (None: ``G0 = 0``);
    they need non-complement bases. With ``G0 = 0`` the result is :func:`low_rank_factors`; a basis
    stored as its complement ``C`` (the kept space) gives ``keep = 0`` and ``L R = −(CCᵀ)…``. Bases must
    be None or non-empty unless complement (an empty complement keeps nothing: the result is 0).
    Computed in ``G``'s dtype; with offsets in float32 for a half-precision ``G`` (``G V`` and
    ``G0 V`` nearly cancel there). ``UtD``: ``Uᵀ(G − G0)`` given by the caller (``k_out×in``, e.g.
    summed over the row shards of ``G`` and ``U``); ``UtG0`` is then ignored.
    """
    wd = G.dtype
    if (GV0 is not None or UtG0 is not None or UtD is not None) and G.dtype in (torch.float16, torch.bfloat16):
        wd = torch.float32
    Gw = G.to(wd)
    U = None if U is None else U.to(wd)
    V = None if V is None else V.to(wd)

    def right(H, B):  # H (I − BBᵀ) as H − (HB)Bᵀ
        return H - (H @ B) @ B.mT

    if U_complement or V_complement:
        if GV0 is not None or UtG0 is not None:
            raise ValueError("the thin offsets G0 V and Uᵀ G0 need non-complement bases")
        if V is not None and V_complement:
            Q = Gw @ V                                   # out×kv: G VcVcᵀ = Q Vcᵀ
            if U is None:
                return 0, -Q, V.mT
            UtQ = UtD.to(wd) @ V if UtD is not None else U.mT @ Q  # over row shards only P V is global
            Q = U @ UtQ if U_complement else Q - U @ UtQ
            return 0, -Q, V.mT
        P = U.mT @ Gw                                    # U complement (V normal or absent): Uc (UcᵀG)(I−VVᵀ)
        return 0, -U, (P if V is None else right(P, V))
    if U is None and V is None:
        return 1, Gw.new_zeros(Gw.shape[0], 0), Gw.new_zeros(0, Gw.shape[1])
    Q = None if V is None else Gw @ V
    if Q is not None and GV0 is not None:
        Q = Q - GV0.to(wd)
    if UtD is not None:
        P = UtD.to(wd)
    else:
        P = None if U is None else U.mT @ Gw
        if P is not None and UtG0 is not None:
            P = P - UtG0.to(wd)
    if U is None:
        return 1, Q, V.mT
    if V is None:
        return 1, U, P
    UtQ = P @ V if UtD is not None else U.mT @ Q  # Uᵀ D V; over row shards only P V is global
    return 1, torch.cat([U, Q - U @ UtQ], dim=1), torch.cat([P, V.mT], dim=0)
