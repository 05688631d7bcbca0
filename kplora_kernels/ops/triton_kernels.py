"""Triton kernels for the residual projection (GPU; the CPU interpreter under ``TRITON_INTERPRET=1``).

Every launch takes a *group* of same-shaped matrices through arrays of 64-bit data pointers (one grid
axis per entry): the leading batch dims of one ``G`` and the list of a grouped in-place projection
are the same thing to the kernels, one launch per group, no Python loop of launches.

* ``_rows_kernel`` (one-sided ``s·G(I−VVᵀ)``, the paper's case, and pass 2 of the two-sided one):
  per block of rows, accumulate ``Q = G_blk V`` over column tiles in fp32, then write
  ``s·(G_blk − Q Vᵀ)`` tile by tile: one HBM read of ``G`` (the second sweep of the same rows finds
  them in L2) and one write. An fp32 offset ``Q₀`` (``out×k_in``, formed by torch) is subtracted from
  ``Q``: ``G₀V`` for the constraint restore, plus ``U (P V)`` two-sided, where ``U_blk P`` is also
  subtracted in sweep 2, ``P = Uᵀ(G − G₀)`` coming from pass 1 (keeping ``P V`` out of the kernel
  keeps a ``k_out×k_in`` fp32 tile out of its registers).
* ``_cols_kernel`` (pass 1 of two-sided): ``P = UᵀG − UᵀG₀`` per block of columns, fp32.
* ``_epilogue_kernel``: ``s·(keep·G − L R)`` for thin factors from torch (complement bases, or a
  rank above :data:`FUSED_MAX_K`, where the product is compute-bound and cuBLAS forms ``L``).

Offsets are int64 (a matrix of ≥ 2³¹ elements, or a row stride times a row index past 2³¹, is
addressed correctly). The autotune keys hold the column count and the padded ranks (the epilogue's
``K`` rounded up to a power of two), not the row count: a new token count, layer rank or task does
not re-tune. The candidates come from :mod:`.triton_configs`, pruned per arch class to those that fit.

Per launch the host builds one int64 buffer (every pointer array and the scales; pinned, copied
``non_blocking``): no stream sync. Bases are cast to the compute dtype once per version
(:mod:`.cast_cache`). An in-place launch whose key has not been tuned yet first runs the autotuner
with the outputs redirected to a scratch buffer, so no trial touches the caller's data.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import struct

import torch
import triton
import triton.language as tl

from . import triton_configs as tc
from .cast_cache import as_compute
from .torch_backend import thin_factors

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FUSED_MAX_K = 128  # ranks up to this run through the fused kernels; above, cuBLAS + epilogue
_DT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


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


def _rows_kernel_fn(Gp, Op, Vp, Q0p, Up, Pp, S, M, N, KV, KU,
                    stride_gm, stride_gn, stride_om, stride_on, stride_vn, stride_vk,
                    stride_qm, stride_qk, stride_um, stride_uk, stride_pk, stride_pn,
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
    if HAS_Q0:  # the offset: G0 V (restore) + U_blk (P V) (two-sided), fp32 from torch
        q0_ptr = _ptr(tl.load(Q0p + b), 0)
        q -= tl.load(q0_ptr + _offsets(rm, rkv, stride_qm, stride_qk), mask=mask_m[:, None] & mask_kv[None, :], other=0.0)
    if HAS_U:  # two-sided: L = [U, Q − U (P V)], R = [P; Vᵀ] with P = Uᵀ(G − G0) from pass 1
        rku = tl.arange(0, KUP)
        mask_ku = rku < KU
        u_ptr = _ptr(tl.load(Up + b), DT)
        p_ptr = _ptr(tl.load(Pp + b), 0)
        u = tl.load(u_ptr + _offsets(rm, rku, stride_um, stride_uk), mask=mask_m[:, None] & mask_ku[None, :],
                    other=0.0)
        if IEEE:
            u = u.to(tl.float32)
    # sweep 2: s·(G_blk − Q Vᵀ [− U_blk P]), the same rows again (from L2). For bf16/fp16 the
    # operands are rounded to the input dtype (as torch's half GEMMs round Q and P): fp32 operand
    # tiles of KVP/KUP = 128 replicated per warp would spill registers.
    if IEEE:
        qd = q
    else:
        qd = q.to(v_ptr.dtype.element_ty)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        mask = mask_m[:, None] & mask_n[None, :]
        vt = tl.load(v_ptr + _offsets(rkv, rn, stride_vk, stride_vn), mask=mask_kv[:, None] & mask_n[None, :],
                     other=0.0)
        corr = _dot(qd, vt.to(qd.dtype), IEEE)
        if HAS_U:
            p = tl.load(p_ptr + _offsets(rku, rn, stride_pk, stride_pn), mask=mask_ku[:, None] & mask_n[None, :], other=0.0)
            corr += _dot(u, p.to(u.dtype), IEEE)
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
                        DT: tl.constexpr, LT: tl.constexpr, KEEP: tl.constexpr, UPCAST: tl.constexpr,
                        IEEE: tl.constexpr, KB: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``O = s·(KEEP·G − L R)`` per tile; K tiled by BLOCK_K; L, R of element code LT. ``KB``: K rounded
    up to a power of two, the autotune key (unused in the body)."""
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
                        r_ptr + _offsets(rk, rn, stride_rk, stride_rn), mask_k[:, None] & mask_n[None, :], UPCAST, IEEE)
    mask = mask_m[:, None] & mask_n[None, :]
    if KEEP:
        g = tl.load(g_ptr + _offsets(rm, rn, stride_gm, stride_gn), mask=mask, other=0.0)
        result = scale * (g.to(tl.float32) - acc)
    else:
        result = -scale * acc
    tl.store(o_ptr + _offsets(rm, rn, stride_om, stride_on), result.to(o_ptr.dtype.element_ty), mask=mask)


_rows_kernel = triton.jit(_rows_kernel_fn)
_cols_kernel = triton.jit(_cols_kernel_fn)
_epilogue_kernel = triton.jit(_epilogue_kernel_fn)
AUTOTUNE_KEYS = {"rows": ["N", "KVP", "KUP", "HAS_U", "HAS_Q0", "DT"], "cols": ["N", "KUP", "DT"],
                 "epilogue": ["N", "KB", "KEEP", "DT", "LT"]}


def build_kernels(configs=None, do_bench=None):
    """The three autotuned kernels over :func:`.triton_configs.all_candidates`, pruned per launch to
    the arch class's table; ``configs`` (a dict kind → list of ``triton.Config``, not pruned) and
    ``do_bench`` replace the defaults (tests emulate multi-config autotuning with a stub)."""
    configs = configs or {}

    def tuned(fn, kind):
        prune = None if kind in configs else {"early_config_prune": tc.early_prune(kind)}
        kernel = triton.autotune(configs=configs.get(kind) or tc.all_candidates(kind), key=AUTOTUNE_KEYS[kind],
                                 prune_configs_by=prune, do_bench=do_bench)(fn)
        kernel.kplora_tuned = set()  # keys already tuned (on scratch outputs, see _launch)
        return kernel

    return {"rows": tuned(_rows_kernel, "rows"), "cols": tuned(_cols_kernel, "cols"),
            "epilogue": tuned(_epilogue_kernel, "epilogue")}


KERNELS = build_kernels()


# --- launchers ----------------------------------------------------------------------------------

class _Pack:
    """Every pointer array and the scale vector of one launch in one int64 buffer: one host list
    becomes one tensor (pinned on CUDA, copied ``non_blocking``: no stream sync). Segments start on
    16-byte boundaries (Triton specialises pointer arguments on that alignment)."""

    def __init__(self):
        self.words, self.buffer = [], None

    def _start(self) -> int:
        if len(self.words) % 2:
            self.words.append(0)
        return len(self.words)

    def pointers(self, items) -> tuple:
        start = self._start()
        self.words.extend(t if isinstance(t, int) else t.data_ptr() for t in items)
        return start, len(self.words) - start, torch.int64

    def floats(self, values) -> tuple:
        start, n = self._start(), len(values)
        even = [float(v) for v in values] + [0.0] * (n % 2)
        self.words.extend(struct.unpack(f"<{len(even) // 2}q", struct.pack(f"<{len(even)}f", *even)))
        return start, n, torch.float32

    def upload(self, device) -> None:
        cuda = device.type == "cuda"
        host = torch.tensor(self.words, dtype=torch.int64, pin_memory=cuda)
        self.buffer = host.to(device, non_blocking=True) if cuda else host

    def __getitem__(self, segment) -> torch.Tensor:
        start, n, dtype = segment
        return self.buffer[start:start + n] if dtype == torch.int64 else \
            self.buffer[start:start + (n + 1) // 2].view(torch.float32)[:n]


def _launch(kernel, grid, args, kwargs, scratch=None) -> None:
    """``kernel[grid](*args, **kwargs)``. ``scratch``: ``(index of the output-pointer argument,
    pointer array to a scratch buffer)`` for an in-place launch whose autotune key is new: the
    autotuner then benchmarks with the outputs redirected there, and the real launch finds the key
    tuned (no trial writes the caller's data)."""
    if scratch is not None:
        index, pointers = scratch
        kernel[grid](*args[:index], pointers, *args[index + 1:], **kwargs)
        kernel.kplora_tuned.add(_tune_key(kernel, args, kwargs))
    kernel[grid](*args, **kwargs)


def _tune_key(kernel, args, kwargs) -> tuple:
    named = dict(zip(kernel.arg_names, args)) | kwargs
    return tuple(named[k] for k in kernel.keys) + (args[0].device,)


def _needs_scratch(kernel, args, kwargs, in_place) -> bool:
    return in_place and len(kernel.configs) > 1 and _tune_key(kernel, args, kwargs) not in kernel.kplora_tuned


def _scratch_for(pack, out, nb):
    """A scratch buffer with ``out``'s shape and strides and a pointer segment naming it ``nb`` times."""
    buffer = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=out.device)
    return buffer, pack.pointers([buffer] * nb)


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
    """Run entries ``(G, out, U, V, scale, U_complement, V_complement, GV0, UtG0[, UtD])`` that share
    a :func:`group_key`: writes ``s·(I−UUᵀ)(G − G0)(I−VVᵀ)`` into each ``out`` (``out`` may be ``G``;
    ``G0`` as offsets ``GV0 = G0V``, ``UtG0 = UᵀG0``, for the restore with ``s = 1``; ``UtD`` a given
    ``Uᵀ(G − G0)``). Empty bases are None here unless complement. 2-D, fp32/fp16/bf16."""
    entries = [tuple(e) + (None,) * (10 - len(e)) for e in entries]
    G, out, U, V, _, uc, vc, GV0, UtG0, UtD = entries[0]
    M, N = G.shape
    if M == 0 or N == 0:
        return
    dev, dt, nb = G.device, G.dtype, len(entries)
    code = _DT_CODES[dt]
    ieee = dt == torch.float32 or INTERPRET
    in_place = any(e[1].data_ptr() == e[0].data_ptr() for e in entries)
    pack = _Pack()
    g_seg, o_seg = pack.pointers([e[0] for e in entries]), pack.pointers([e[1] for e in entries])
    s_seg = pack.floats([e[4] for e in entries])
    kU = 0 if U is None else U.shape[1]
    kV = 0 if V is None else V.shape[1]
    if not (uc or vc) and 0 < kV <= FUSED_MAX_K and kU <= FUSED_MAX_K:
        _fused(entries, pack, g_seg, o_seg, s_seg, M, N, kU, kV, code, ieee, in_place)
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
    l_seg, r_seg = pack.pointers(Ls), pack.pointers(Rs)
    kernel = KERNELS["epilogue"]
    args = [None, None, None, None, None, M, N, K, G.stride(0), G.stride(1), out.stride(0), out.stride(1),
            *(Ls[0].stride() if K else (0, 0)), *(Rs[0].stride() if K else (0, 0))]
    kwargs = dict(DT=code, LT=_DT_CODES[Ls[0].dtype], KEEP=bool(keep), UPCAST=INTERPRET, IEEE=ieee, KB=tc.pow2(K))
    scratch = _scratch_for(pack, out, nb) if _needs_scratch(kernel, [G] + args[1:], kwargs, in_place) else None
    pack.upload(dev)
    args[:5] = pack[g_seg], pack[o_seg], pack[l_seg], pack[r_seg], pack[s_seg]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), nb)  # noqa: E731
    _launch(kernel, grid, args, kwargs, scratch and (1, pack[scratch[1]]))


def _fused(entries, pack, g_seg, o_seg, s_seg, M, N, kU, kV, code, ieee, in_place) -> None:
    """The fused path (ranks ≤ FUSED_MAX_K, no complement): the column pass for ``P = Uᵀ(G − G0)``
    when two-sided, the offset ``Q0 = G0 V + U (P V)`` (``out×k_in``, fp32) by torch, then the row kernel.
    One packed upload for both launches."""
    G, out = entries[0][0], entries[0][1]
    dev, dt, nb = G.device, G.dtype, len(entries)
    Vs = [as_compute(e[3], dt) for e in entries]
    Q0s = [e[7].float().contiguous() for e in entries] if entries[0][7] is not None else None
    Us = Ps = P0s = None
    if kU:
        Us = [as_compute(e[2], dt) for e in entries]
        GV0s, Q0s = Q0s, list(torch.empty(nb, M, kV, dtype=torch.float32, device=dev))
        if entries[0][9] is not None:  # Uᵀ(G − G0) given (summed over row shards by the caller)
            Ps = [e[9].float().contiguous() for e in entries]
        else:
            Ps = list(torch.empty(nb, kU, N, dtype=torch.float32, device=dev))
            P0s = [e[8].float().contiguous() for e in entries] if entries[0][8] is not None else None
    segs = {name: pack.pointers(ts) for name, ts in (("V", Vs), ("Q0", Q0s), ("U", Us), ("P", Ps), ("P0", P0s))
            if ts is not None}
    kwargs = dict(DT=code, KVP=tc.pow2(max(kV, kU)), KUP=tc.pow2(max(kV, kU)) if kU else 16,
                  HAS_Q0=Q0s is not None, HAS_U=bool(kU), UPCAST=INTERPRET, IEEE=ieee)
    strides = [*(Q0s[0].stride() if Q0s else (0, 0)), *(Us[0].stride() if Us else (0, 0)),
               *(Ps[0].stride() if Ps else (0, 0))]
    args = [G, None, None, None, None, None, None, M, N, kV, kU, G.stride(0), G.stride(1), out.stride(0),
            out.stride(1), Vs[0].stride(0), Vs[0].stride(1), *strides]
    kernel = KERNELS["rows"]
    scratch = _scratch_for(pack, out, nb) if _needs_scratch(kernel, args, kwargs, in_place) else None
    pack.upload(dev)
    gp = pack[g_seg]
    ptr = lambda name: pack[segs[name]] if name in segs else gp  # noqa: E731
    if kU and entries[0][9] is None:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), nb)  # noqa: E731
        KERNELS["cols"][grid](gp, ptr("P"), ptr("U"), ptr("P0"), M, N, kU, G.stride(0), G.stride(1),
                              Us[0].stride(0), Us[0].stride(1), *(P0s[0].stride() if P0s else (0, 0)),
                              DT=code, KUP=tc.pow2(kU), HAS_P0=P0s is not None, UPCAST=INTERPRET, IEEE=ieee)
    for i, e in enumerate(entries if kU else ()):  # Q0 = U (P V) [+ G0 V], out×k_in, fp32
        torch.matmul(as_compute(e[2], torch.float32), Ps[i] @ as_compute(e[3], torch.float32), out=Q0s[i])
        if GV0s:
            Q0s[i].add_(GV0s[i])
    args[:7] = gp, pack[o_seg], ptr("V"), ptr("Q0"), ptr("U"), ptr("P"), pack[s_seg]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), nb)  # noqa: E731
    _launch(kernel, grid, args, kwargs, scratch and (1, pack[scratch[1]]))


def left_products(Gs, Us) -> list:
    """``[Uᵢᵀ Gᵢ]`` in float32 (``k_out×in``) by the column-pass kernel, one launch per group of
    equal shapes and chunk of ``FUSED_MAX_K`` columns of U (pass 1 of a two-sided projection whose
    products are summed between the passes); one packed upload per group."""
    results = [None] * len(Gs)
    groups: dict = {}
    for i, (G, U) in enumerate(zip(Gs, Us)):
        groups.setdefault((tuple(G.shape), G.stride(), G.dtype, G.device, U.shape[1]), []).append(i)
    for idx in groups.values():
        G, kU = Gs[idx[0]], Us[idx[0]].shape[1]
        M, N = G.shape
        dev = G.device
        U_list = [as_compute(Us[i], G.dtype) for i in idx]
        P_all = torch.zeros(len(idx), kU, N, dtype=torch.float32, device=dev)
        for j, i in enumerate(idx):
            results[i] = P_all[j]
        if M == 0 or N == 0 or kU == 0:
            continue
        pack = _Pack()
        g_seg = pack.pointers([Gs[i] for i in idx])
        chunks = [(c, min(FUSED_MAX_K, kU - c)) for c in range(0, kU, FUSED_MAX_K)]  # the accumulator is k×BLOCK_N
        segs = [(pack.pointers([P[c:] for P in P_all]), pack.pointers([U_[:, c:c + kc] for U_ in U_list]))
                for c, kc in chunks]
        pack.upload(dev)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), len(idx))  # noqa: E731
        with torch.cuda.device(dev) if G.is_cuda else contextlib.nullcontext():
            for (c, kc), (p_seg, u_seg) in zip(chunks, segs):
                KERNELS["cols"][grid](pack[g_seg], pack[p_seg], pack[u_seg], pack[g_seg], M, N, kc, G.stride(0),
                                      G.stride(1), U_list[0].stride(0), U_list[0].stride(1), 0, 0,
                                      DT=_DT_CODES[G.dtype], KUP=tc.pow2(kc), HAS_P0=False, UPCAST=INTERPRET,
                                      IEEE=G.dtype == torch.float32 or INTERPRET)
    return results


def project(G, U, V, scale, out, *, U_complement=False, V_complement=False, GV0=None, UtG0=None) -> None:
    """Writes ``scale·(I−UUᵀ)(G − G0)(I−VVᵀ)`` into ``out`` (may be ``G``; with offsets, see
    :func:`project_group`); ``G`` is ``(..., out, in)``: its leading dims are one launch's group."""
    if G.numel() == 0:
        return
    U = U if U_complement or U is None or U.shape[1] else None
    V = V if V_complement or V is None or V.shape[1] else None
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
