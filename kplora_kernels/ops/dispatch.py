"""Which backend runs an op, and why a backend cannot: the one place for both.

``backend=None`` picks Triton for CUDA tensors; on CPU tensors the C++ kernels except where they
were measured to lose to the torch backend (thin matrices, :func:`cpp_pays`), the torch backend there. ``"triton"``,
``"cpp"`` or ``"torch"`` force one; the environment variable ``KPLORA_BACKEND`` forces one for every
call without ``backend``. A forced backend that cannot run raises a ``ValueError`` listing every
reason (never a silent fallback to torch); the reasons come from :func:`not_supported_reasons` (the
projection ops) and :func:`sketch_not_supported_reasons` (the sketch update) alone, modelled on
xformers' ``ops/fmha/dispatch.py``, where each operator lists why it does not support an input.
"""
from __future__ import annotations

import os

import torch

from . import cpp

BACKENDS = ("torch", "cpp", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def _triton_device_reason(t: torch.Tensor) -> str | None:
    if t.is_cuda:
        from .triton_configs import device_arch

        return device_arch(t.device)[1]  # the launch tables start at sm_86's 101,376 B
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1 set before triton is imported, "
            f"for CPU tensors), got a tensor on {t.device}")


def not_supported_reasons(backend: str, t: torch.Tensor, *, U_complement: bool = False,
                          V_complement: bool = False, U_sharded: bool = False, jit: bool = False) -> list[str]:
    """Why ``backend`` cannot project the tensor ``t`` (a gradient/weight ``G`` or rows ``X``) with
    bases in the given form; an empty list when it can. ``U_sharded``: ``U`` is a row shard whose
    products ``UᵀG`` are summed by the caller between the two passes (``U_reduce``). ``jit=True``
    lets the C++ check compile the kernels when the ahead-of-time build is missing (~30 s, once)."""
    reasons = []
    if backend == "torch":
        return reasons
    if backend == "cpp":
        if t.device.type != "cpu":
            reasons.append(f"the C++ kernels run on CPU tensors only, got a tensor on {t.device}")
        if U_complement or V_complement:
            side = "U" if U_complement else "V"
            reasons.append(f"{side} is stored as its complement (the kept space): the C++ kernel applies "
                           "I − BBᵀ only; backend=None or 'torch' projects with the complement")
        if U_sharded:
            reasons.append("U is a row shard (U_reduce given): UᵀG must be summed between the two passes, "
                           "which the C++ kernel runs back to back; backend=None or 'torch' runs them apart")
        if not reasons and not cpp.load(jit=jit):
            reasons.append(f"the C++ kernels are not built: {cpp.unavailable_reason()}")
        return reasons
    if backend == "triton":
        if t.dtype not in TRITON_DTYPES:
            reasons.append(f"the Triton kernel takes float32, float16 or bfloat16, got {t.dtype}")
        device = _triton_device_reason(t)
        if device:
            reasons.append(device)
        error = _triton_import_error()
        if error:
            reasons.append(error)
        return reasons
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


# Measured on the CPU (2 cores, torch 2.14; bench/test_bench_ops_path.py, bench/README.md "Op layer"):
# the C++ tile pass in place against the torch backend's thin factors and one addmm_. Thin
# matrices lose in C++: a LoRA factor (dB out×r against U, dA r×in against V; r = 16, k = 64–512)
# runs 2–3× slower, 128×1024 with k = 16 0.75–0.9×. Weights whose smaller side is ≥ 512 and ≥ 16·k
# are at parity (0.9–1.3× across runs of this shared machine, 256²–4096², one or two sides); there
# the C++ kernel stays the default, as it takes a whole group of weights in one call.
CPP_MIN_SIDE = 512
CPP_MIN_SIDE_PER_K = 16


def cpp_pays(t: torch.Tensor, k_out: int = 0, k_in: int = 0) -> bool:
    """Whether the C++ kernel is the CPU default for a ``rows×cols`` matrix (the last two dims of
    ``t``) with bases of ``k_out`` and ``k_in`` columns: not for thin matrices (the window above)."""
    rows, cols = (t.shape[-2], t.shape[-1]) if t.dim() >= 2 else (1, t.shape[-1])
    side = min(rows, cols)
    return side >= CPP_MIN_SIDE and side >= CPP_MIN_SIDE_PER_K * max(k_out, k_in)


def resolve_backend(t: torch.Tensor, backend: str | None, *, U_complement: bool = False,
                    V_complement: bool = False, U_sharded: bool = False, k_out: int | None = None,
                    k_in: int | None = None) -> str:
    """The backend that will run for tensor ``t``; raises ``ValueError`` with the reasons when a
    forced one (argument or ``KPLORA_BACKEND``) cannot run. ``k_out``/``k_in``: the basis widths,
    for the measured C++ window on CPU (:func:`cpp_pays`); None takes the C++ kernel wherever it
    can run."""
    forced = backend or os.environ.get("KPLORA_BACKEND") or None
    flags = dict(U_complement=U_complement, V_complement=V_complement, U_sharded=U_sharded)
    if forced is None:
        if t.is_cuda:
            return "triton" if not not_supported_reasons("triton", t, **flags) else "torch"
        pays = k_out is None or k_in is None or cpp_pays(t, k_out, k_in)
        return "cpp" if pays and not not_supported_reasons("cpp", t, **flags) else "torch"
    if forced not in BACKENDS:
        source = "backend" if backend else "KPLORA_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {forced!r}")
    reasons = not_supported_reasons(forced, t, jit=True, **flags)
    if reasons:
        raise ValueError(f"backend {forced!r} cannot run here: " + "; ".join(reasons))
    return forced


def basis_width(B) -> int:
    return 0 if B is None else B.shape[1]


# --- the sketch update -------------------------------------------------------------------------------

def sketch_not_supported_reasons(backend: str, A: torch.Tensor, B: torch.Tensor, K: int, L: int = 0) -> list[str]:
    """Why ``backend`` cannot run the sketch update ``(Aᵀ(B M1), Bᵀ(A M2))`` for ``A`` ``tokens×a``,
    ``B`` ``tokens×b`` and sketch widths ``K`` (``M1``) and ``L`` (``M2``, 0 without it)."""
    if backend == "torch":
        return []
    if backend == "cpp":
        return ["there is no C++ sketch kernel: backend=None or 'torch' runs the sketch update as torch GEMMs"]
    if backend != "triton":
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    error = _triton_import_error()
    if error:
        return [error]
    from . import sketch_triton

    reasons = []
    if A.dtype not in sketch_triton.DTYPES or B.dtype != A.dtype:
        reasons.append(f"the Triton sketch kernel takes A and B of one dtype among float32, float16 and "
                       f"bfloat16, got {A.dtype} and {B.dtype}")
    if A.device != B.device:
        reasons.append(f"A is on {A.device} but B is on {B.device}")
    if A.is_cuda:
        device = _triton_device_reason(A)
        if device:
            reasons.append(device)
    else:
        if not (A.device.type == "cpu" and sketch_triton.INTERPRET and os.environ.get("KPLORA_BACKEND") == "triton"):
            reasons.append(f"the Triton sketch kernel needs CUDA tensors (or, for CPU tensors, TRITON_INTERPRET=1 "
                           f"set before triton is imported and KPLORA_BACKEND=triton), got a tensor on {A.device}")
    if not 1 <= K <= sketch_triton.MAX_K:
        reasons.append(f"the sketch width K = {K} is outside [1, {sketch_triton.MAX_K}], the widths the kernel "
                       "keeps in registers")
    if L > sketch_triton.MAX_L:
        reasons.append(f"the sketch width L = {L} exceeds {sketch_triton.MAX_L}, the widths the kernel keeps in registers")
    if not reasons and not sketch_triton.usable(A, B, K, L):  # the launcher's own limits (e.g. resources)
        reasons.append(f"kplora_kernels.ops.sketch_triton.usable refuses A {tuple(A.shape)} {A.dtype}, "
                       f"B {tuple(B.shape)}, K = {K}, L = {L}")
    return reasons


def resolve_sketch_backend(A: torch.Tensor, B: torch.Tensor, K: int, L: int = 0, backend: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for a sketch update: by default Triton where it can run (CUDA, or
    the interpreter when ``KPLORA_BACKEND=triton``); a forced backend that cannot run raises
    ``ValueError`` with the reasons."""
    forced = backend or os.environ.get("KPLORA_BACKEND") or None
    if forced is None:
        return "triton" if A.is_cuda and not sketch_not_supported_reasons("triton", A, B, K, L) else "torch"
    if forced not in BACKENDS:
        source = "backend" if backend else "KPLORA_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {forced!r}")
    reasons = sketch_not_supported_reasons(forced, A, B, K, L)
    if reasons:
        raise ValueError(f"backend {forced!r} cannot run the sketch update here: " + "; ".join(reasons))
    return forced
