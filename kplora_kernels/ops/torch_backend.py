"""The torch backend of the ops: thin products and one ``addmm`` per matrix, for arguments that were
already validated. It runs on any device and dtype, and serves what the C++ and Triton kernels do not
take (see :func:`kplora_kernels.ops.not_supported_reasons`).

Orientation: ``G`` is ``out×in``; ``U`` is ``out×k_out``, ``V`` is ``in×k_in`` with orthonormal
columns. A basis flagged as a complement spans the *kept* space, so the projector on that side is
``B Bᵀ`` rather than ``I − B Bᵀ``. Bases are cast to the compute dtype once per version
(:mod:`.cast_cache`), not per call.
"""
from __future__ import annotations

import itertools

import torch

from .cast_cache import as_compute
from .validation import nonempty, same_view


def _project_right(H: torch.Tensor, V: torch.Tensor, complement: bool) -> torch.Tensor:
    """``H (I − V Vᵀ)``, or ``H V Vᵀ`` when ``V`` spans the kept space."""
    if V.shape[1] == 0:
        return H.new_zeros(H.shape) if complement else H
    kept = (H @ V) @ V.mT
    return kept if complement else H - kept


def residual_project(G, U, V, scale: float, U_complement: bool = False, V_complement: bool = False) -> torch.Tensor:
    """``scale · (I − U Uᵀ) G (I − V Vᵀ)`` for ``G`` ``(..., out, in)`` in ``G``'s dtype (bases cast to
    it). Always a new tensor, never ``G`` or a view of it (also when both bases are absent or empty
    and ``scale`` is 1)."""
    H = G
    fresh = False  # whether H is a new tensor (an empty non-complement basis leaves G as it is)
    if V is not None:
        H = _project_right(H, as_compute(V, G.dtype), V_complement)
        fresh = fresh or V_complement or V.shape[1] > 0
    if U is not None:
        H = _project_right(H.mT, as_compute(U, G.dtype), U_complement).mT
        fresh = fresh or U_complement or U.shape[1] > 0
    if scale != 1.0:
        return H * scale
    return H if fresh else H.clone()


def thin_factors(G: torch.Tensor, U: torch.Tensor | None, V: torch.Tensor | None, *,
                 U_complement: bool = False, V_complement: bool = False,
                 GV0: torch.Tensor | None = None, UtG0: torch.Tensor | None = None,
                 UtD: torch.Tensor | None = None):
    """``(keep, L, R)`` with ``(I − UUᵀ) D (I − VVᵀ) = keep·D − L R`` for the 2-D ``D = G − G0``,
    from thin products only: ``L`` is ``out×K``, ``R`` is ``K×in``, ``keep`` is 1 or 0.

    ``GV0 = G0 V`` and ``UtG0 = Uᵀ G0`` are the offsets of the constraint restore (None: ``G0 = 0``);
    they need non-complement bases. With ``G0 = 0`` and both bases: ``L = [U, Q − U(UᵀQ)]``,
    ``R = [UᵀG; Vᵀ]`` with ``Q = GV``; a basis stored as its complement ``C`` (the kept space) gives
    ``keep = 0`` and ``L R = −(CCᵀ)…``. Bases must be None or non-empty unless complement (an empty
    complement keeps nothing: the result is 0). Computed in ``G``'s dtype; with offsets in float32
    for a half-precision ``G`` (``G V`` and ``G0 V`` nearly cancel there). ``UtD``: ``Uᵀ(G − G0)``
    given by the caller (``k_out×in``, e.g. summed over the row shards of ``G`` and ``U``); ``UtG0``
    is then ignored.
    """
    wd = G.dtype
    if (GV0 is not None or UtG0 is not None or UtD is not None) and G.dtype in (torch.float16, torch.bfloat16):
        wd = torch.float32
    Gw = G.to(wd)
    U = None if U is None else as_compute(U, wd)  # once per basis version (cast_cache)
    V = None if V is None else as_compute(V, wd)

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


def project_into_(out: torch.Tensor, G: torch.Tensor, U, V, scale: float, U_complement: bool = False,
                  V_complement: bool = False, GV0=None, UtG0=None, UtD=None) -> None:
    """Write ``scale·(keep·G − L R)`` (:func:`thin_factors`) into ``out`` (``G``'s shape; may be ``G``
    itself), one ``addmm`` per matrix of a batch ``(..., out, in)``. With offsets this is the restore
    ``G − L R`` (scale 1)."""
    for index in itertools.product(*map(range, G.shape[:-2])):
        G2, out2 = G[index], out[index]
        keep, L, R = thin_factors(G2, U if U_complement else nonempty(U), V if V_complement else nonempty(V),
                                  U_complement=U_complement, V_complement=V_complement,
                                  GV0=GV0, UtG0=UtG0, UtD=UtD)
        beta = scale * keep
        if out2.dtype == L.dtype:
            if same_view(out2, G2):
                out2.addmm_(L, R, beta=beta, alpha=-scale)
            else:
                torch.addmm(G2, L, R, beta=beta, alpha=-scale, out=out2)
        else:  # half-precision G with float32 factors: compute the matrix in float32, round once
            out2.copy_(torch.addmm(G2.to(L.dtype), L, R, beta=beta, alpha=-scale))


def subspace_anchor(W0: torch.Tensor, U: torch.Tensor | None, V: torch.Tensor | None):
    """``(W0 V, Uᵀ W0)`` (``out×k_in`` and ``k_out×in``; None for an absent basis) in ``W0``'s dtype,
    float32 for a half-precision ``W0`` (bases cast to it)."""
    dt = torch.float32 if W0.dtype in (torch.float16, torch.bfloat16) else W0.dtype
    W = W0.to(dt)
    W0V = None if V is None else W @ V.to(dt)
    UtW0 = None if U is None else U.to(dt).mT @ W
    return W0V, UtW0


def left_product(G: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``Uᵀ G`` (``k_out×in``), float32 for half precision."""
    wd = torch.float32 if G.dtype in (torch.float16, torch.bfloat16) else G.dtype
    return as_compute(U, wd).mT @ G.to(wd)


def sketch_update(A: torch.Tensor, B: torch.Tensor, M1: torch.Tensor, M2: torch.Tensor | None = None):
    """``(Aᵀ(B M1), Bᵀ(A M2) or None, ‖B M1‖² + ‖A M2‖²)`` in float32 (inputs upcast), for ``A``
    ``tokens×a``, ``B`` ``tokens×b``, ``M1`` ``b×K``, ``M2`` ``a×L``: the two skinny products per side."""
    Af, Bf = A.float(), B.float()
    P = Bf @ M1.float()
    acc1 = Af.mT @ P
    probe = P.square().sum()
    acc2 = None
    if M2 is not None:
        Q = Af @ M2.float()
        acc2 = Bf.mT @ Q
        probe = probe + Q.square().sum()
    return acc1, acc2, probe
