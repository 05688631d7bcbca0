"""Which backend runs a projection op, and why a backend cannot: the one place for both.

``backend=None`` picks Triton for CUDA tensors, the C++ kernels for CPU tensors when they are built,
and the torch reference otherwise. ``"triton"``, ``"cpp"`` or ``"torch"`` force one; the environment
variable ``KPLORA_BACKEND`` forces one for every call without ``backend``. A forced backend that
cannot run raises a ``ValueError`` listing every reason (never a silent fallback to torch); the
reasons come from :func:`not_supported_reasons` alone (modelled on xformers'
``ops/fmha/dispatch.py``, where each operator lists why it does not support an input).
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
        if not (t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
            reasons.append(f"the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1 set before "
                           f"triton is imported, for CPU tensors), got a tensor on {t.device}")
        error = _triton_import_error()
        if error:
            reasons.append(error)
        return reasons
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def resolve_backend(t: torch.Tensor, backend: str | None, *, U_complement: bool = False,
                    V_complement: bool = False, U_sharded: bool = False) -> str:
    """The backend that will run for tensor ``t``; raises ``ValueError`` with the reasons when a
    forced one (argument or ``KPLORA_BACKEND``) cannot run."""
    forced = backend or os.environ.get("KPLORA_BACKEND") or None
    flags = dict(U_complement=U_complement, V_complement=V_complement, U_sharded=U_sharded)
    if forced is None:
        order = ("triton", "torch") if t.is_cuda else ("cpp", "torch")
        return next(b for b in order if not not_supported_reasons(b, t, **flags))
    if forced not in BACKENDS:
        source = "backend" if backend else "KPLORA_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {forced!r}")
    reasons = not_supported_reasons(forced, t, jit=True, **flags)
    if reasons:
        raise ValueError(f"backend {forced!r} cannot run here: " + "; ".join(reasons))
    return forced
