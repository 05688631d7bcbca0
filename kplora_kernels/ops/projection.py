"""Public projection ops with backend dispatch.

``backend=None`` picks Triton for CUDA tensors (fp32/fp16/bf16), the C++ kernels for CPU tensors
when they are built, and the torch reference otherwise. ``"triton"``, ``"cpp"`` or ``"torch"`` force
one; the environment variable ``KPLORA_BACKEND`` does the same for every call without ``backend``.
All backends validate exactly as the reference does, before any kernel launch.
"""
from __future__ import annotations

import itertools
import os

import torch

from . import cpp, reference

BACKENDS = ("torch", "cpp", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_usable(t: torch.Tensor) -> bool:
    if t.dtype not in TRITON_DTYPES:
        return False
    if not (t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(t: torch.Tensor, backend: str | None) -> str:
    """The backend that will run for tensor ``t``; raises when a forced one cannot."""
    backend = backend or os.environ.get("KPLORA_BACKEND") or None
    if backend is None:
        if t.is_cuda:
            return "triton" if _triton_usable(t) else "torch"
        return "cpp" if t.device.type == "cpu" and cpp.load() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "cpp":
        if t.device.type != "cpu":
            raise ValueError(f"backend 'cpp' needs CPU tensors, got a tensor on {t.device}")
        if not cpp.load(jit=True):
            raise RuntimeError(f"backend 'cpp' is not available: {cpp.unavailable_reason()}")
    if backend == "triton" and not _triton_usable(t):
        raise ValueError(f"backend 'triton' needs a CUDA tensor (or TRITON_INTERPRET=1 set before import, "
                         f"for CPU tensors) of dtype float32/float16/bfloat16 and an installed triton; "
                         f"got {t.dtype} on {t.device}")
    return backend


def _check_out(out: torch.Tensor, G: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != G.shape or out.dtype != G.dtype or out.device != G.device:
        raise ValueError(f"out must match G: expected shape {tuple(G.shape)}, {G.dtype} on {G.device}; "
                         f"got shape {tuple(out.shape)}, {out.dtype} on {out.device}")


def _nonempty(B: torch.Tensor | None) -> torch.Tensor | None:
    return None if B is None or B.shape[1] == 0 else B


def _triton_project(G, U, V, scale, out):
    from . import triton_kernels

    U = None if U is None else U.to(G.dtype)
    V = None if V is None else V.to(G.dtype)
    for index in itertools.product(*map(range, G.shape[:-2])):  # leading batch dims, as views
        triton_kernels.residual_project_2d(G[index], U, V, scale, out[index])


def residual_project(G: torch.Tensor, U: torch.Tensor | None = None, V: torch.Tensor | None = None,
                     scale: float = 1.0, *, out: torch.Tensor | None = None, backend: str | None = None,
                     U_complement: bool = False, V_complement: bool = False) -> torch.Tensor:
    """``scale · (I − U Uᵀ) G (I − V Vᵀ)``; see :func:`kplora_kernels.ops.reference.residual_project`.

    G: ``(..., out, in)``; U: ``out×k_out`` or None; V: ``in×k_in`` or None. ``out=G`` projects in
    place without a second ``out×in`` buffer. A basis flagged ``*_complement`` spans the kept space
    (stored when the protected one covers more than half of the space): the op is then a product of
    thin factors and runs through torch GEMMs on every backend.
    """
    scale = reference.validate_residual_project(G, U, V, scale)
    if out is not None:
        _check_out(out, G)
    name = resolve_backend(G, backend)
    U_sub = None if U_complement else _nonempty(U)
    V_sub = None if V_complement else _nonempty(V)
    if name == "torch" or U_complement or V_complement or (U_sub is None and V_sub is None):
        result = reference.residual_project_unchecked(G, U, V, scale, U_complement, V_complement)
        return result if out is None else out.copy_(result)
    if name == "cpp":
        if out is None:
            return torch.ops.kplora.residual_project(G, U_sub, V_sub, scale)
        if out.data_ptr() == G.data_ptr() and out.stride() == G.stride():
            torch.ops.kplora.residual_project_(out, U_sub, V_sub, scale)
        else:
            torch.ops.kplora.residual_project_out(G, U_sub, V_sub, scale, out=out)
        return out
    if out is None:
        out = torch.empty_like(G, memory_format=torch.contiguous_format)
    _triton_project(G, U_sub, V_sub, scale, out)
    return out


def project_rows(X: torch.Tensor, V: torch.Tensor, scale: float = 1.0, *, backend: str | None = None,
                 V_complement: bool = False) -> torch.Tensor:
    """``scale · (X − (X V) Vᵀ)`` for ``X`` of shape ``(..., d)`` and ``V`` ``d×k``; a new tensor."""
    scale = reference.validate_project_rows(X, V, scale)
    name = resolve_backend(X, backend)
    if name == "torch" or V_complement or V.shape[1] == 0 or X.numel() == 0:
        return reference.residual_project_unchecked(X, None, V, scale, V_complement=V_complement)
    if name == "cpp":
        return torch.ops.kplora.project_rows(X, V, scale)
    X2 = X.reshape(-1, X.shape[-1])
    out = torch.empty(X2.shape, dtype=X.dtype, device=X.device)
    _triton_project(X2, None, V, scale, out)
    return out.view(X.shape)
