"""Triton kernels for the residual projection (GPU; the CPU interpreter under ``TRITON_INTERPRET=1``).

Every launch takes a *group* of same-shaped matrices through arrays of 64-bit data pointers (one grid
axis per entry): the leading batch dims of one ``G`` and the list of a grouped in-place projection
are the same thing to the kernels, one launch per group, no Python loop of launches.

* ``_rows_kernel`` (one-sided ``s·G(I−VVᵀ)``, the paper's case, and pass 2 of the two-sided one):
  per block of rows, accumulate ``Q = G_blk V`` over column tiles in fp32, then write
  ``s·(G_blk − Q Vᵀ)`` tile by tile: one HBM read of ``G`` (the second sweep of the same rows finds
  them in L2) and one write. With ``U``: ``Q −= U_blk (P V)`` and ``U_blk P`` is also subtracted,
  ``P = Uᵀ(G − G₀)`` coming from pass 1. An offset ``Q₀ = G₀V`` gives the constraint restore.
* ``_cols_kernel`` (pass 1 of two-sided): ``P = UᵀG − UᵀG₀`` per block of columns, fp32.
* ``_epilogue_kernel``: ``s·(keep·G − L R)`` for thin factors from torch (complement bases, or a
  rank above :data:`FUSED_MAX_K`, where the product is compute-bound and cuBLAS forms ``L``).

Offsets are int64 (a matrix of ≥ 2³¹ elements, or a row stride times a row index past 2³¹, is
addressed correctly). The autotune keys hold the column count and the ranks, not the row count (a
new token count does not re-tune). In-place launches are safe under autotuning: while configs are
benchmarked, the outputs of the group are saved before and restored after each trial.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import thin_factors

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FUSED_MAX_K = 128  # ranks up to this run through the fused kernels; above, cuBLAS + epilogue
_DT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# --- in-place safety under autotuning -----------------------------------------------------------

_INPLACE_OUTPUTS: dict[int, list] = {}  # data_ptr of a launch's output-pointer array -> its outputs
_SAVED: dict[int, list] = {}


def _save_outputs(nargs, reset_only=False):
    if reset_only:
        return
    key = nargs["Op"].data_ptr()
    if key in _INPLACE_OUTPUTS:
        _SAVED[key] = [t.clone() for t in _INPLACE_OUTPUTS[key]]


def _restore_outputs(nargs, exception):
    for t, saved in zip(_INPLACE_OUTPUTS.get(nargs["Op"].data_ptr(), []), _SAVED.pop(nargs["Op"].data_ptr(), [])):
        t.copy_(saved)


def _configs(kind: str):
    if INTERPRET:  # the interpreter takes one config and no benchmarking (docs/design.md §3)
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16})]
    if kind == "rows":
        shapes = [(16, 128, 4, 3), (32, 128, 4, 3), (32, 64, 4, 4), (64, 64, 4, 3), (64, 128, 8, 3), (16, 256, 4, 3)]
    elif kind == "cols":
        shapes = [(64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4)]
    else:
        shapes = [(128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 3), (128, 256, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 32}, num_warps=w, num_stages=s)
            for bm, bn, w, s in shapes]


@triton.jit
def _ptr(addr, CODE: tl.constexpr):
    """A 64-bit address from a pointer array as a typed pointer (0 fp32, 1 fp16, 2 bf16)."""
    if CODE == 0:
        p = addr.to(tl.pointer_type(tl.float32))
    elif CODE == 1:
        p = addr.to(tl.pointer_type(tl.float16))
    else:
        p = addr.to(tl.pointer_type(tl.bfloat16))
    return p


@triton.jit
def _offsets(rows, cols, stride_r, stride_c):
    """Element offsets ``rows·stride_r + cols·stride_c`` of a tile, in int64."""
    return rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _load_dot(acc, a_ptrs, a_mask, b_ptrs, b_mask, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``acc + a @ b`` for two tiles loaded under their masks (zeros outside). ``UPCAST``: both in fp32
    first, for the interpreter, whose tl.dot is only right in fp32 (docs/design.md §3)."""
    a = tl.load(a_ptrs, mask=a_mask, other=0.0)
    b = tl.load(b_ptrs, mask=b_mask, other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return acc + _dot(a, b, IEEE)


def _rows_kernel_fn(Gp, Op, Vp, Q0p, Up, Pp, Wp, S, M, N, KV, KU,
                    stride_gm, stride_gn, stride_om, stride_on, stride_vn, stride_vk,
                    stride_qm, stride_qk, stride_um, stride_uk, stride_pk, stride_pn, stride_wk, stride_wj,
                    DT: tl.constexpr, KVP: tl.constexpr, KUP: tl.constexpr, HAS_Q0: tl.constexpr,
                    HAS_U: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(1)
    g_ptr = _ptr(tl.load(Gp + b), DT)
    o_ptr = _ptr(tl.load(Op + b), DT)
    v_ptr = _ptr(tl.load(Vp + b), DT)
    scale = tl.load(S + b)
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rm < M
    rkv = tl.arange(0, KVP)
    mask_kv = rkv < KV
    # sweep 1: Q = G_blk V (fp32)
    q = tl.zeros((BLOCK_M, KVP), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        q = _load_dot(q, g_ptr + _offsets(rm, rn, stride_gm, stride_gn), mask_m[:, None] & mask_n[None, :],
                      v_ptr + _offsets(rn, rkv, stride_vn, stride_vk), mask_n[:, None] & mask_kv[None, :], UPCAST, IEEE)
    if HAS_Q0:  # the restore's offset G0 V
        q0_ptr = _ptr(tl.load(Q0p + b), 0)
        q -= tl.load(q0_ptr + _offsets(rm, rkv, stride_qm, stride_qk), mask=mask_m[:, None] & mask_kv[None, :], other=0.0)
    if HAS_U:  # two-sided: L = [U, Q − U (P V)], R = [P; Vᵀ] with P = Uᵀ(G − G0) from pass 1
        rku = tl.arange(0, KUP)
        mask_ku = rku < KU
        u_ptr = _ptr(tl.load(Up + b), DT)
        p_ptr = _ptr(tl.load(Pp + b), 0)
        w_ptr = _ptr(tl.load(Wp + b), 0)
        u = tl.load(u_ptr + _offsets(rm, rku, stride_um, stride_uk), mask=mask_m[:, None] & mask_ku[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(w_ptr + _offsets(rku, rkv, stride_wk, stride_wj), mask=mask_ku[:, None] & mask_kv[None, :], other=0.0)
        q -= _dot(u, w, IEEE)
    # sweep 2: s·(G_blk − Q Vᵀ [− U_blk P]), the same rows again (from L2)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        mask = mask_m[:, None] & mask_n[None, :]
        vt = tl.load(v_ptr + _offsets(rkv, rn, stride_vk, stride_vn), mask=mask_kv[:, None] & mask_n[None, :],
                     other=0.0).to(tl.float32)
        corr = _dot(q, vt, IEEE)
        if HAS_U:
            p = tl.load(p_ptr + _offsets(rku, rn, stride_pk, stride_pn), mask=mask_ku[:, None] & mask_n[None, :], other=0.0)
            corr += _dot(u, p, IEEE)
        g = tl.load(g_ptr + _offsets(rm, rn, stride_gm, stride_gn), mask=mask, other=0.0)
        result = scale * (g.to(tl.float32) - corr)
        tl.store(o_ptr + _offsets(rm, rn, stride_om, stride_on), result.to(o_ptr.dtype.element_ty), mask=mask)


def _cols_kernel_fn(Gp, Op, Up, P0p, M, N, KU, stride_gm, stride_gn, stride_um, stride_uk, stride_pk, stride_pn,
                    DT: tl.constexpr, KUP: tl.constexpr, HAS_P0: tl.constexpr, UPCAST: tl.constexpr,
                    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pass 1 of two-sided: ``Op[b] = Uᵀ G − P0`` (``KU×N``, fp32, contiguous)."""
    b = tl.program_id(1)
    g_ptr = _ptr(tl.load(Gp + b), DT)
    u_ptr = _ptr(tl.load(Up + b), DT)
    o_ptr = _ptr(tl.load(Op + b), 0)
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    rku = tl.arange(0, KUP)
    mask_ku = rku < KU
    acc = tl.zeros((KUP, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mask_m = rm < M
        acc = _load_dot(acc, u_ptr + _offsets(rku, rm, stride_uk, stride_um), mask_ku[:, None] & mask_m[None, :],
                        g_ptr + _offsets(rm, rn, stride_gm, stride_gn), mask_m[:, None] & mask_n[None, :], UPCAST, IEEE)
    mask = mask_ku[:, None] & mask_n[None, :]
    if HAS_P0:
        p0_ptr = _ptr(tl.load(P0p + b), 0)
        acc -= tl.load(p0_ptr + _offsets(rku, rn, stride_pk, stride_pn), mask=mask, other=0.0)
    tl.store(o_ptr + _offsets(rku, rn, N, 1), acc, mask=mask)


def _epilogue_kernel_fn(Gp, Op, Lp, Rp, S, M, N, K, stride_gm, stride_gn, stride_om, stride_on,
                        stride_lm, stride_lk, stride_rk, stride_rn,
                        DT: tl.constexpr, LT: tl.constexpr, KEEP: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``O = s·(KEEP·G − L R)`` per tile; K tiled by BLOCK_K; L, R of element code LT."""
    b = tl.program_id(2)
    g_ptr = _ptr(tl.load(Gp + b), DT)
    o_ptr = _ptr(tl.load(Op + b), DT)
    l_ptr = _ptr(tl.load(Lp + b), LT)
    r_ptr = _ptr(tl.load(Rp + b), LT)
    scale = tl.load(S + b)
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        acc = _load_dot(acc, l_ptr + _offsets(rm, rk, stride_lm, stride_lk), mask_m[:, None] & mask_k[None, :],
                        r_ptr + _offsets(rk, rn, stride_rk, stride_rn), mask_k[:, None] & mask_n[None, :], True, IEEE)
    mask = mask_m[:, None] & mask_n[None, :]
    if KEEP:
        g = tl.load(g_ptr + _offsets(rm, rn, stride_gm, stride_gn), mask=mask, other=0.0)
        result = scale * (g.to(tl.float32) - acc)
    else:
        result = -scale * acc
    tl.store(o_ptr + _offsets(rm, rn, stride_om, stride_on), result.to(o_ptr.dtype.element_ty), mask=mask)


def build_kernels(configs=None, do_bench=None):
    """The three autotuned kernels; ``configs`` (a dict kind → list of ``triton.Config``) and
    ``do_bench`` replace the defaults (tests emulate multi-config autotuning with a stub)."""
    configs = configs or {}

    def tuned(fn, kind, key):
        return triton.autotune(configs=configs.get(kind) or _configs(kind), key=key, pre_hook=_save_outputs,
                               post_hook=_restore_outputs, do_bench=do_bench)(triton.jit(fn))

    return {"rows": tuned(_rows_kernel_fn, "rows", ["N", "KVP", "KUP", "HAS_U", "HAS_Q0", "DT"]),
            "cols": tuned(_cols_kernel_fn, "cols", ["N", "KUP", "DT"]),
            "epilogue": tuned(_epilogue_kernel_fn, "epilogue", ["N", "K", "KEEP", "DT", "LT"])}


KERNELS = build_kernels()


# --- launchers ----------------------------------------------------------------------------------

def _pointers(tensors, device):
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


def _pow2(k: int) -> int:
    return max(16, triton.next_power_of_2(max(k, 1)))


def _launch(kernel, grid, Op, outputs, in_place, *args, **kwargs):
    """Launch with the outputs registered for save/restore while the autotuner benchmarks configs."""
    key = Op.data_ptr()
    if in_place:
        _INPLACE_OUTPUTS[key] = outputs
    try:
        kernel[grid](*args, **kwargs)
    finally:
        _INPLACE_OUTPUTS.pop(key, None)
        _SAVED.pop(key, None)


def group_key(G, out, U, V, uc, vc, GV0, UtG0, UtD=None):
    """Entries with equal keys run in one launch."""
    k = lambda B: None if B is None else B.shape[1]  # noqa: E731
    return (tuple(G.shape), G.dtype, G.device, G.stride(), out.stride(), k(U), k(V), uc, vc,
            GV0 is not None, UtG0 is not None, UtD is not None)


def project_group(entries) -> None:
    """See :func:`_project_group`; launches on the device of the entries."""
    if entries and entries[0][0].is_cuda:
        with torch.cuda.device(entries[0][0].device):
            _project_group(entries)
    else:
        _project_group(entries)


def _project_group(entries) -> None:
    """Run entries ``(G, out, U, V, scale, U_complement, V_complement, GV0, UtG0)`` that share a
    :func:`group_key`: writes ``s·(I−UUᵀ)(G − G0)(I−VVᵀ)`` into each ``out`` (``out`` may be ``G``;
    ``G0`` as offsets ``GV0 = G0V``, ``UtG0 = UᵀG0``, for the restore with ``s = 1``). Empty bases are
    None here unless complement. 2-D, fp32/fp16/bf16."""
    entries = [tuple(e) + (None,) * (10 - len(e)) for e in entries]
    G, out, U, V, _, uc, vc, GV0, UtG0, UtD = entries[0]
    M, N = G.shape
    if M == 0 or N == 0:
        return
    dev, dt = G.device, G.dtype
    code = _DT_CODES[dt]
    in_place = any(e[1].data_ptr() == e[0].data_ptr() for e in entries)
    Gp, Op = _pointers([e[0] for e in entries], dev), _pointers([e[1] for e in entries], dev)
    outs = [e[1] for e in entries]
    S = torch.tensor([float(e[4]) for e in entries], dtype=torch.float32, device=dev)
    nb = len(entries)
    kU = 0 if U is None else U.shape[1]
    kV = 0 if V is None else V.shape[1]
    ieee = dt == torch.float32
    fused = not (uc or vc) and kV > 0 and kV <= FUSED_MAX_K and kU <= FUSED_MAX_K
    if fused:
        Vs = [e[3].to(dt).contiguous() for e in entries]
        Q0s = [e[7].float().contiguous() for e in entries] if GV0 is not None else None
        Us = Ps = Ws = None
        if kU and UtD is not None:  # Uᵀ(G − G0) given (summed over row shards by the caller)
            Us = [e[2].to(dt).contiguous() for e in entries]
            Ps = [e[9].float().contiguous() for e in entries]
            Ws = [P @ Vb.float() for P, Vb in zip(Ps, Vs)]
        elif kU:
            Us = [e[2].to(dt).contiguous() for e in entries]
            Ps = [torch.empty(kU, N, dtype=torch.float32, device=dev) for _ in entries]
            P0s = [e[8].float().contiguous() for e in entries] if UtG0 is not None else None
            Pp = _pointers(Ps, dev)
            kernel = KERNELS["cols"]
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), nb)  # noqa: E731
            kernel[grid](Gp, Pp, _pointers(Us, dev), _pointers(P0s, dev) if P0s else Gp, M, N, kU,
                         G.stride(0), G.stride(1), Us[0].stride(0), Us[0].stride(1),
                         *(P0s[0].stride() if P0s else (0, 0)),
                         DT=code, KUP=_pow2(kU), HAS_P0=P0s is not None, UPCAST=INTERPRET, IEEE=ieee or INTERPRET)
            Ws = [P @ Vb.float() for P, Vb in zip(Ps, Vs)]  # P V, k_out×k_in
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), nb)  # noqa: E731
        _launch(KERNELS["rows"], grid, Op, outs, in_place,
                Gp, Op, _pointers(Vs, dev), _pointers(Q0s, dev) if Q0s else Gp,
                _pointers(Us, dev) if Us else Gp, _pointers(Ps, dev) if Ps else Gp,
                _pointers(Ws, dev) if Ws else Gp, S, M, N, kV, kU,
                G.stride(0), G.stride(1), out.stride(0), out.stride(1), Vs[0].stride(0), Vs[0].stride(1),
                *(Q0s[0].stride() if Q0s else (0, 0)), *(Us[0].stride() if Us else (0, 0)),
                *(Ps[0].stride() if Ps else (0, 0)), *(Ws[0].stride() if Ws else (0, 0)),
                DT=code, KVP=_pow2(kV), KUP=_pow2(kU), HAS_Q0=Q0s is not None, HAS_U=bool(kU),
                UPCAST=INTERPRET, IEEE=ieee or INTERPRET)
        return
    # general: thin factors from torch (cuBLAS), then one epilogue launch for the group
    factors = [thin_factors(e[0], e[2], e[3], U_complement=e[5], V_complement=e[6], GV0=e[7], UtG0=e[8],
                            UtD=e[9]) for e in entries]
    keep = factors[0][0]
    lt = factors[0][1].dtype
    Ls = [f[1].to(lt).contiguous() for f in factors]
    Rs = [f[2].to(lt).contiguous() for f in factors]
    K = Ls[0].shape[1]
    if K == 0:  # nothing to subtract: keep a valid address for the (never executed) loads
        Ls = Rs = [e[0] for e in entries]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), nb)  # noqa: E731
    _launch(KERNELS["epilogue"], grid, Op, outs, in_place,
            Gp, Op, _pointers(Ls, dev), _pointers(Rs, dev), S, M, N, K,
            G.stride(0), G.stride(1), out.stride(0), out.stride(1),
            *(Ls[0].stride() if K else (0, 0)), *(Rs[0].stride() if K else (0, 0)),
            DT=code, LT=_DT_CODES[Ls[0].dtype], KEEP=bool(keep), IEEE=ieee or INTERPRET)


def left_products(Gs, Us) -> list:
    """``[Uᵢᵀ Gᵢ]`` in float32 (``k_out×in``) by the column-pass kernel, one launch per group of
    equal shapes (pass 1 of a two-sided projection whose products are summed between the passes)."""
    results = [None] * len(Gs)
    groups: dict = {}
    for i, (G, U) in enumerate(zip(Gs, Us)):
        groups.setdefault((tuple(G.shape), G.stride(), G.dtype, G.device, U.shape[1]), []).append(i)
    for idx in groups.values():
        G, kU = Gs[idx[0]], Us[idx[0]].shape[1]
        M, N = G.shape
        dev = G.device
        U_list = [Us[i].to(G.dtype).contiguous() for i in idx]
        P_list = [torch.zeros(kU, N, dtype=torch.float32, device=dev) for _ in idx]
        for i, P in zip(idx, P_list):
            results[i] = P
        if M == 0 or N == 0 or kU == 0:
            continue
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), len(idx))  # noqa: E731
        Gp = _pointers([Gs[i] for i in idx], dev)
        for c in range(0, kU, FUSED_MAX_K):  # chunks of U's columns: the accumulator is k×BLOCK_N
            kc = min(FUSED_MAX_K, kU - c)
            U_c = [U_[:, c:c + kc] for U_ in U_list]
            with torch.cuda.device(dev) if G.is_cuda else _nullcontext():
                KERNELS["cols"][grid](Gp, _pointers([P[c:] for P in P_list], dev), _pointers(U_c, dev), Gp, M, N,
                                      kc, G.stride(0), G.stride(1), U_c[0].stride(0), U_c[0].stride(1), 0, 0,
                                      DT=_DT_CODES[G.dtype], KUP=_pow2(kc), HAS_P0=False, UPCAST=INTERPRET,
                                      IEEE=G.dtype == torch.float32 or INTERPRET)
    return results


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def project(G, U, V, scale, out, *, U_complement=False, V_complement=False, GV0=None, UtG0=None) -> None:
    """Writes ``scale·(I−UUᵀ)(G − G0)(I−VVᵀ)`` into ``out`` (may be ``G``; with offsets, see
    :func:`project_group`); ``G`` is ``(..., out, in)``: its leading dims are one launch's group."""
    if G.numel() == 0:
        return
    U = U if U_complement or U is None or U.shape[1] else None
    V = V if V_complement or V is None or V.shape[1] else None
    import itertools

    index = list(itertools.product(*map(range, G.shape[:-2])))  # leading dims: entries of one launch
    project_group([(G[i], out[i], U, V, scale, U_complement, V_complement, GV0, UtG0) for i in index])


def project_grouped_(entries) -> None:
    """In-place projection of ``[G, U, V, scale, U_complement, V_complement]`` entries: one launch
    per group of same-shaped, same-rank entries."""
    groups: dict = {}
    for G, U, V, s, uc, vc in entries:
        if G.numel() == 0:
            continue
        U = U if uc or U is None or U.shape[1] else None
        V = V if vc or V is None or V.shape[1] else None
        e = (G, G, U, V, s, uc, vc, None, None)
        groups.setdefault(group_key(G, G, U, V, uc, vc, None, None), []).append(e)
    for group in groups.values():
        project_group(group)
