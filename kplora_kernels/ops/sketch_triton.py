"""Triton kernel for the randomized sketch updates (GPU; the CPU interpreter under ``TRITON_INTERPRET=1``).

One launch per batch reads each token tile of ``A`` (``tokens×a``) and ``B`` (``tokens×b``) from
memory once (the second touch of the tile, in the same program, hits L2) and accumulates

    ``acc1 (a×K) += Aᵀ (B M1)``   and, with ``M2``,   ``acc2 (b×L) += Bᵀ (A M2)``

where ``M1`` (``b×K``) and ``M2`` (``a×L``) are the projected test matrices. For the gradient sketch
``A = dY``, ``B = X``, ``M1 = Ω̂``, ``M2 = Ψ̂ᵀ``: ``acc1 = Σ dYᵀ(XΩ̂)`` and ``acc2 = (Σ (dYΨ̂ᵀ)ᵀ X)ᵀ``.
For the input sketch ``A = B = X``, ``M1 = Ω̂``, no ``M2``. Per token tile the program forms
``P = B_t M1`` and ``Q = A_t M2`` in registers, adds their squared norms to a probe (the finiteness
check folded into the pass: NaN/Inf or float32 overflow make it non-finite; it is read when the
sketch decides, never as a host sync inside the kernel) and adds ``A_tᵀ P`` and ``B_tᵀ Q`` to the
fp32 accumulators with atomics (the summation order over tiles is not deterministic).

Precision: fp32 inputs multiply in IEEE fp32 (as torch's fp32 GEMM); bf16/fp16 inputs multiply in
their own dtype on tensor cores with fp32 accumulation (``M1``/``M2`` and, for bf16, ``P``/``Q`` are
rounded to the input dtype, as a torch bf16 GEMM would; fp16 keeps ``P``/``Q`` in fp32, its range
being too small); under the interpreter everything is upcast to fp32
before ``tl.dot`` (docs/design.md §3). Block sizes come from the arch class's table on the sketch
widths (:func:`.triton_configs.sketch_config`, checked by ``kplora kernels``; no autotuning, nothing
keyed on the token count, which changes every batch).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import triton_configs as tc
from .triton_kernels import _dot, _load_dot, _offsets

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_K, MAX_L = 128, 256  # sketch widths a program keeps in registers; wider sketches use torch GEMMs


@triton.jit
def _sketch_update_kernel(A, B, M1, M2, ACC1, ACC2, PROBE, T, DA, DB, K, L,
                          s_at, s_ad, s_bt, s_bd, s_m1d, s_m1k, s_m2d, s_m2l,
                          s_c1d, s_c1k, s_c2d, s_c2l,
                          TWO: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, WIDE2: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr, LP: tl.constexpr):
    # int64 offsets: tokens × features exceeds 2³¹ elements at realistic sizes (e.g. 2¹⁹ tokens of a
    # 4096-wide layer), and int32 products of a row index by a stride would wrap silently.
    pid = tl.program_id(0).to(tl.int64)
    rt = pid * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    mt = rt < T
    rk = tl.arange(0, KP)
    mk = rk < K
    rl = tl.arange(0, LP)
    ml = rl < L
    # pass 1: P = B_t M1 (BLOCK_T×KP) and Q = A_t M2 (BLOCK_T×LP), fp32 in registers
    P = _tile_times(tl.zeros((BLOCK_T, KP), dtype=tl.float32), B, s_bt, s_bd, DB, rt, mt, M1, s_m1d, s_m1k, rk, mk,
                    UPCAST, IEEE, BLOCK_D)
    probe = tl.sum(tl.sum(P * P, axis=1), axis=0)
    if TWO:
        Q = _tile_times(tl.zeros((BLOCK_T, LP), dtype=tl.float32), A, s_at, s_ad, DA, rt, mt, M2, s_m2d, s_m2l,
                        rl, ml, UPCAST, IEEE, BLOCK_D)
        probe += tl.sum(tl.sum(Q * Q, axis=1), axis=0)
    tl.atomic_add(PROBE, probe)
    # pass 2: ACC1 += A_tᵀ P and ACC2 += B_tᵀ Q, one feature block at a time
    # pass 2 multiplies P (Q) in the input dtype on tensor cores; fp16 (WIDE2) keeps them in fp32,
    # as fp16's range (6.5e4) could overflow where the fp32 probe saw nothing
    Pm = P if (UPCAST or IEEE or WIDE2) else P.to(A.dtype.element_ty)
    _scatter_dots(A, s_at, s_ad, DA, rt, mt, Pm, ACC1, s_c1d, s_c1k, rk, mk, UPCAST, WIDE2, IEEE, BLOCK_D)
    if TWO:
        Qm = Q if (UPCAST or IEEE or WIDE2) else Q.to(B.dtype.element_ty)
        _scatter_dots(B, s_bt, s_bd, DB, rt, mt, Qm, ACC2, s_c2d, s_c2l, rl, ml, UPCAST, WIDE2, IEEE, BLOCK_D)


@triton.jit
def _tile_times(acc, X, s_xt, s_xd, D, rt, mt, M, s_md, s_mj, rj, mj,
                UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_D: tl.constexpr):
    """``acc + X_t M`` for the token tile ``rt`` of ``X`` (``tokens×D``) and ``M`` (``D×J``, columns
    ``rj``), one feature block at a time."""
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        md = rd < D
        acc = _load_dot(acc, X + _offsets(rt, rd, s_xt, s_xd), mt[:, None] & md[None, :],
                        M + _offsets(rd, rj, s_md, s_mj), md[:, None] & mj[None, :], UPCAST, IEEE)
    return acc


@triton.jit
def _scatter_dots(X, s_xt, s_xd, D, rt, mt, R, ACC, s_cd, s_cj, rj, mj,
                  UPCAST: tl.constexpr, WIDE2: tl.constexpr, IEEE: tl.constexpr, BLOCK_D: tl.constexpr):
    """``ACC (D×J) += X_tᵀ R`` for the token tile ``rt`` of ``X`` (``tokens×D``) and ``R`` (tile×J),
    one feature block at a time, with atomics; the tile in fp32 first under the interpreter
    (``UPCAST``) and for fp16 (``WIDE2``, whose ``R`` stays fp32)."""
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        md = rd < D
        x = tl.load(X + _offsets(rt, rd, s_xt, s_xd), mask=mt[:, None] & md[None, :], other=0.0)
        if UPCAST or WIDE2:
            x = x.to(tl.float32)
        tl.atomic_add(ACC + _offsets(rd, rj, s_cd, s_cj), _dot(tl.trans(x), R, IEEE), mask=md[:, None] & mj[None, :])


def usable(A: torch.Tensor, B: torch.Tensor, K: int, L: int = 0) -> bool:
    """Whether the kernel serves these inputs: CUDA (or, with ``KPLORA_BACKEND=triton``, the
    interpreter on CPU tensors), a supported dtype shared by ``A`` and ``B``, and sketch widths that
    fit in registers. The sketches take this path by themselves on CUDA tensors."""
    forced = os.environ.get("KPLORA_BACKEND") == "triton"
    device_ok = A.is_cuda or (forced and INTERPRET and A.device.type == "cpu")
    return (device_ok and A.dtype in DTYPES and B.dtype == A.dtype and A.device == B.device
            and 1 <= K <= MAX_K and L <= MAX_L)


def launch_config(A: torch.Tensor, K: int, L: int) -> dict:
    """Block sizes, warps and stages for inputs like ``A`` and sketch widths ``K``/``L`` (``L`` 0:
    one-sided): :func:`.triton_configs.sketch_config` for the device's arch class (nothing keyed on
    the token count). Under the interpreter: small blocks."""
    arch = tc.arch_class(A.device) if A.is_cuda else 90
    return tc.sketch_config(arch, tc.DTYPE_NAMES[DTYPES.index(A.dtype)], tc.pow2(K), tc.pow2(L) if L else 0)


def sketch_update(A: torch.Tensor, B: torch.Tensor, M1: torch.Tensor, M2: torch.Tensor | None = None):
    """One batch's contributions ``(Aᵀ(B M1), Bᵀ(A M2) or None, probe)`` as fresh fp32 tensors.

    ``A``: ``tokens×a``, ``B``: ``tokens×b`` (the same dtype: fp32, fp16 or bf16; any strides),
    ``M1``: ``b×K``, ``M2``: ``a×L`` (cast to the inputs' dtype). ``probe`` is the fp32 device scalar
    ``‖B M1‖² + ‖A M2‖²``: non-finite when the batch holds NaN/Inf or overflows float32. The caller
    adds the contributions to its state only when the probe is finite (no host sync here).
    """
    T, DA = A.shape
    DB = B.shape[1]
    K = M1.shape[1]
    L = 0 if M2 is None else M2.shape[1]
    if not usable(A, B, K, L) or B.shape[0] != T or M1.shape[0] != DB or (M2 is not None and M2.shape[0] != DA):
        raise ValueError(f"sketch_update: unsupported inputs A {tuple(A.shape)} {A.dtype} on {A.device}, "
                         f"B {tuple(B.shape)} {B.dtype}, M1 {tuple(M1.shape)}, "
                         f"M2 {None if M2 is None else tuple(M2.shape)}")
    mdtype = A.dtype
    M1c = M1.to(mdtype)
    M2c = M1c if M2 is None else M2.to(mdtype)
    acc1 = torch.zeros(DA, K, device=A.device, dtype=torch.float32)
    acc2 = torch.zeros(DB, max(L, 1), device=A.device, dtype=torch.float32) if M2 is not None else acc1
    probe = torch.zeros((), device=A.device, dtype=torch.float32)
    meta = launch_config(A, K, L)
    grid = (triton.cdiv(T, meta["BLOCK_T"]),)
    if T > 0:
        _sketch_update_kernel[grid](
            A, B, M1c, M2c, acc1, acc2, probe, T, DA, DB, K, max(L, 1),
            A.stride(0), A.stride(1), B.stride(0), B.stride(1), M1c.stride(0), M1c.stride(1),
            M2c.stride(0), M2c.stride(1), acc1.stride(0), acc1.stride(1), acc2.stride(0), acc2.stride(1),
            TWO=M2 is not None, UPCAST=INTERPRET, IEEE=(A.dtype == torch.float32 and not INTERPRET),
            WIDE2=A.dtype == torch.float16,
            BLOCK_T=meta["BLOCK_T"], BLOCK_D=meta["BLOCK_D"], KP=tc.pow2(K), LP=tc.pow2(max(L, 1)),
            num_warps=meta["num_warps"], num_stages=meta["num_stages"])
    return acc1, (acc2 if M2 is not None else None), probe
