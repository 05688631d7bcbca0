"""Triton kernels for the residual projection (GPU; the CPU interpreter under ``TRITON_INTERPRET=1``).

``P(G) = s·(G − L R)`` with the thin factors of :func:`reference.low_rank_factors` (cuBLAS). One
epilogue kernel then reads each tile of ``G`` once, accumulates ``L_t R`` in fp32 and writes
``s·(G_t − L_t R)`` (in place when ``out`` is ``G``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import thin_factors

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if INTERPRET:  # the interpreter takes one config and no benchmarking (DESIGN §3)
    _CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16})]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
                                 (64, 64, 64, 4, 3), (128, 256, 32, 8, 3), (64, 256, 32, 8, 3)]
    ]


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _epilogue_kernel(G, L, R, O, M, N, K,
                     stride_gm, stride_gn, stride_lm, stride_lk, stride_rk, stride_rn,
                     stride_om, stride_on, scale,
                     KEEP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        l_t = tl.load(L + rm[:, None] * stride_lm + rk[None, :] * stride_lk,
                      mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        r_t = tl.load(R + rk[:, None] * stride_rk + rn[None, :] * stride_rn,
                      mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot is only right in fp32 (DESIGN §3)
            l_t = l_t.to(tl.float32)
            r_t = r_t.to(tl.float32)
        if IEEE:
            acc += tl.dot(l_t, r_t, input_precision="ieee")
        else:
            acc += tl.dot(l_t, r_t)
    mask = mask_m[:, None] & mask_n[None, :]
    if KEEP:
        g = tl.load(G + rm[:, None] * stride_gm + rn[None, :] * stride_gn, mask=mask, other=0.0)
        result = scale * (g.to(tl.float32) - acc)
    else:
        result = -scale * acc
    tl.store(O + rm[:, None] * stride_om + rn[None, :] * stride_on, result.to(O.dtype.element_ty), mask=mask)


def project(G, U, V, scale, out, *, U_complement=False, V_complement=False, GV0=None, UtG0=None) -> None:
    """Writes ``scale·(I−UUᵀ)(G − G0)(I−VVᵀ)`` (+ ``G0`` when offsets are given) into ``out`` (may be
    ``G``); ``G`` is ``(..., out, in)`` in fp32, fp16 or bf16."""
    import itertools

    for index in itertools.product(*map(range, G.shape[:-2])):
        G2, out2 = G[index], out[index]
        if G2.numel() == 0:
            continue
        U2 = U if U_complement or U is None or U.shape[1] else None
        V2 = V if V_complement or V is None or V.shape[1] else None
        keep, L, R = thin_factors(G2, U2, V2, U_complement=U_complement, V_complement=V_complement,
                                  GV0=GV0, UtG0=UtG0)
        if L.dtype != G2.dtype and L.dtype != torch.float32:
            L, R = L.to(G2.dtype), R.to(G2.dtype)
        M, N = G2.shape
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        _epilogue_kernel[grid](G2, L, R, out2, M, N, L.shape[1],
                               G2.stride(0), G2.stride(1), L.stride(0), L.stride(1), R.stride(0), R.stride(1),
                               out2.stride(0), out2.stride(1), float(scale), KEEP=bool(keep),
                               UPCAST=INTERPRET or L.dtype != G2.dtype,
                               IEEE=G2.dtype == torch.float32)


def project_grouped_(entries) -> None:
    """In-place projection of ``[G, U, V, scale, U_complement, V_complement]`` entries."""
    for G, U, V, s, uc, vc in entries:
        project(G, U, V, s, G, U_complement=uc, V_complement=vc)
