"""Public projection ops with backend dispatch (see :mod:`kplora_kernels.ops.dispatch`).

All backends validate exactly as the reference does, before any kernel launch. Results never alias
inputs: without ``out=`` a new tensor is returned, and an ``out=`` that shares memory with an input
(other than ``out=G`` itself, the in-place form) is refused with a ``ValueError``.
"""
from __future__ import annotations

import torch

from . import reference
from .dispatch import BACKENDS, TRITON_DTYPES, not_supported_reasons, resolve_backend  # noqa: F401


# --- aliasing ---------------------------------------------------------------------------------------

def _byte_range(t: torch.Tensor) -> tuple[int, int] | None:
    if t.numel() == 0:
        return None
    start = t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of ``a`` and ``b`` intersect (conservative for interleaved views)."""
    ra, rb = _byte_range(a), _byte_range(b)
    return ra is not None and rb is not None and ra[0] < rb[1] and rb[0] < ra[1]


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are the same elements in the same layout (the in-place case)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def has_internal_overlap(t: torch.Tensor) -> bool:
    """A written tensor must not have two indices on one element (e.g. an ``expand``-ed view)."""
    return any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride())) or \
        torch._debug_has_internal_overlap(t) == 1


def check_out(out, G: torch.Tensor, inputs: dict, name: str = "out") -> None:
    """``out`` must match ``G`` in shape, dtype and device, be writable without internal overlap, and
    share no memory with ``inputs`` (name → tensor or None); ``out`` may be ``G`` itself."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != G.shape or out.dtype != G.dtype or out.device != G.device:
        raise ValueError(f"{name} must match G: expected shape {tuple(G.shape)}, {G.dtype} on {G.device}; "
                         f"got shape {tuple(out.shape)}, {out.dtype} on {out.device}")
    if has_internal_overlap(out):
        raise ValueError(f"{name} has overlapping elements (strides {tuple(out.stride())}, e.g. an "
                         "expanded view); it cannot be written")
    for input_name, t in inputs.items():
        if t is None or (input_name == "G" and same_view(out, t)):
            continue
        if may_overlap(out, t):
            what = "is a different view of G's memory (e.g. transposed or shifted)" if input_name == "G" \
                else f"shares memory with {input_name}"
            raise ValueError(f"{name} {what}: the kernels would read values they already overwrote. "
                             f"Pass {name}=G for an in-place projection, or a separate buffer")


def _nonempty(B: torch.Tensor | None) -> torch.Tensor | None:
    return None if B is None or B.shape[1] == 0 else B


def _cpp_bases(U, V, U_complement, V_complement):
    return (None if U_complement else _nonempty(U)), (None if V_complement else _nonempty(V))


# --- ops --------------------------------------------------------------------------------------------

def project_into_(out: torch.Tensor, G: torch.Tensor, U, V, scale: float, name: str,
                  U_complement: bool, V_complement: bool, GV0=None, UtG0=None, UtD=None) -> None:
    """Write ``scale·(keep·G − L R)`` (:func:`reference.thin_factors`) into ``out`` with backend
    ``name``; arguments were validated. ``out`` may be ``G``. With offsets ``GV0``/``UtG0`` this is
    the restore ``G − L R`` (scale 1); ``UtD`` gives ``Uᵀ(G − G0)`` summed over row shards."""
    if UtD is not None and name == "triton":
        from . import triton_kernels

        triton_kernels.project_group([(G, out, _nonempty(U), _nonempty(V), scale, False, False, GV0, UtG0, UtD)])
        return
    if name == "cpp" and GV0 is None and UtG0 is None and UtD is None:
        U_sub, V_sub = _cpp_bases(U, V, U_complement, V_complement)
        if same_view(out, G):
            torch.ops.kplora.residual_project_(out, U_sub, V_sub, scale)
        else:
            torch.ops.kplora.residual_project_out(G, U_sub, V_sub, scale, out=out)
        return
    if name == "triton":
        from . import triton_kernels

        triton_kernels.project(G, U, V, scale, out, U_complement=U_complement, V_complement=V_complement,
                               GV0=GV0, UtG0=UtG0)
        return
    # torch (also row shards on CPU, which the C++ kernel does not take): thin factors, one addmm per matrix
    for index in _batch_indices(G):
        G2, out2 = G[index], out[index]
        keep, L, R = reference.thin_factors(G2, _nonempty(U) if not U_complement else U,
                                            _nonempty(V) if not V_complement else V,
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


def _batch_indices(G: torch.Tensor):
    import itertools

    return list(itertools.product(*map(range, G.shape[:-2])))


def residual_project(G: torch.Tensor, U: torch.Tensor | None = None, V: torch.Tensor | None = None,
                     scale: float = 1.0, *, out: torch.Tensor | None = None, backend: str | None = None,
                     U_complement: bool = False, V_complement: bool = False) -> torch.Tensor:
    """``scale · (I − U Uᵀ) G (I − V Vᵀ)`` (the residual projection, docs/design.md §1); see
    :func:`kplora_kernels.ops.reference.residual_project` for the oracle.

    G: ``(..., out, in)``; U: ``out×k_out`` or None; V: ``in×k_in`` or None (``k = 0`` allowed);
    orthonormal columns. A basis flagged ``*_complement`` spans the kept space instead (stored when
    the protected one covers more than half of the space). Returns a new tensor, or ``out``:
    ``out=G`` projects in place without a second ``out×in`` buffer; any other ``out`` must not share
    memory with ``G``, ``U`` or ``V``.

    Raises ``TypeError``/``ValueError`` naming the argument for bad input, and ``ValueError`` with the
    reasons when a forced ``backend`` cannot run (see :func:`kplora_kernels.ops.not_supported_reasons`).
    """
    scale = reference.validate_residual_project(G, U, V, scale)
    if out is not None:
        check_out(out, G, {"G": G, "U": U, "V": V})
    name = resolve_backend(G, backend, U_complement=U_complement, V_complement=V_complement)
    if name == "torch" and out is None:
        return reference.residual_project_unchecked(G, U, V, scale, U_complement, V_complement)
    if out is None:
        out = torch.empty_like(G, memory_format=torch.contiguous_format)
    if G.numel():
        project_into_(out, G, U, V, scale, name, U_complement, V_complement)
    return out


def project_rows(X: torch.Tensor, V: torch.Tensor, scale: float = 1.0, *, backend: str | None = None,
                 V_complement: bool = False) -> torch.Tensor:
    """``scale · (X − (X V) Vᵀ)`` for ``X`` of shape ``(..., d)`` and ``V`` ``d×k`` (orthonormal
    columns; ``V_complement``: ``V`` spans the kept space, giving ``scale·(XV)Vᵀ``); a new tensor."""
    scale = reference.validate_project_rows(X, V, scale)
    name = resolve_backend(X, backend, V_complement=V_complement)
    if name == "torch" or X.numel() == 0:
        return reference.residual_project_unchecked(X, None, V, scale, V_complement=V_complement)
    if name == "cpp":
        return torch.ops.kplora.project_rows(X, V, scale)
    X2 = X.reshape(-1, X.shape[-1])
    out = torch.empty(X2.shape, dtype=X.dtype, device=X.device)
    project_into_(out, X2, None, V, scale, name, False, V_complement)
    return out.view(X.shape)
