"""Argument checks of the ops, run once by each public function before any backend is chosen.

Orientation: a weight or gradient ``G`` is ``out×in``; ``U`` is ``out×k_out``, ``V`` is ``in×k_in``
(orthonormal columns, ``k = 0`` allowed). Every check raises ``TypeError`` (wrong kind or dtype) or
``ValueError`` (wrong shape, value, device or aliasing) naming the argument.

Inside ``torch.compile`` the numerical orthonormality probe of a basis is skipped (it reads a value
back to the host, which would break the graph); shapes, dtypes and devices are still checked while
tracing.
"""
from __future__ import annotations

import math

import torch

from .._checks import check_basis, check_same_device, check_tensor


def check_scale(scale) -> float:
    """``scale`` must be a finite Python number (not a bool, not a tensor); returns it as a float."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def basis(name: str, B, dim: int, dim_name: str) -> None:
    """``B`` is an orthonormal ``dim×k`` basis; the orthonormality probe only outside compilation."""
    if torch.compiler.is_compiling():
        check_tensor(name, B, ndim=2)
        if B.shape[0] != dim:
            raise ValueError(f"{name} must have {dim} rows ({dim_name}), got shape {tuple(B.shape)}")
        if B.shape[1] > dim:
            raise ValueError(f"{name} has {B.shape[1]} columns, more than its {dim} rows: it cannot be orthonormal")
        return
    check_basis(name, B, dim, dim_name)


def not_differentiable(**bases) -> None:
    """The bases are constants of every op: a basis that requires a gradient would get none."""
    if not torch.is_grad_enabled():
        return
    for name, B in bases.items():
        if B is not None and B.requires_grad:
            raise ValueError(f"{name} requires grad, but the ops give no gradient to a basis (it is a constant "
                             f"of the projection); pass {name}.detach()")


def residual_project_args(G, U, V, scale) -> float:
    """Check the arguments of :func:`kplora_kernels.ops.residual_project`; returns ``scale`` as a float."""
    check_tensor("G", G, min_ndim=2)
    for name, B in (("U", U), ("V", V)):
        if B is not None:
            check_tensor(name, B, ndim=2)
    check_same_device(G=G, U=U, V=V)
    if U is not None:
        basis("U", U, G.shape[-2], "G.shape[-2], the output size")
    if V is not None:
        basis("V", V, G.shape[-1], "G.shape[-1], the input size")
    return check_scale(scale)


def project_rows_args(X, V, scale) -> float:
    """Check the arguments of :func:`kplora_kernels.ops.project_rows`; returns ``scale`` as a float."""
    check_tensor("X", X, min_ndim=1)
    if V is None:
        raise TypeError("V must be a basis tensor (d×k), got None")
    check_tensor("V", V, ndim=2)
    check_same_device(X=X, V=V)
    basis("V", V, X.shape[-1], "X.shape[-1], the feature size")
    return check_scale(scale)


# --- aliasing ---------------------------------------------------------------------------------------

def _byte_range(t: torch.Tensor) -> tuple[int, int] | None:
    if t.numel() == 0:
        return None
    start = t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of ``a`` and ``b`` intersect (conservative for interleaved views);
    False while tracing, where tensors have no storage (the eager call checked it)."""
    if torch.compiler.is_compiling():
        return False
    ra, rb = _byte_range(a), _byte_range(b)
    return ra is not None and rb is not None and ra[0] < rb[1] and rb[0] < ra[1]


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are the same elements in the same layout (the in-place case)."""
    if torch.compiler.is_compiling():
        return a is b
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def has_internal_overlap(t: torch.Tensor) -> bool:
    """A written tensor must not have two indices on one element (e.g. an ``expand``-ed view)."""
    if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride())):
        return True
    return not torch.compiler.is_compiling() and torch._debug_has_internal_overlap(t) == 1


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


def nonempty(B: torch.Tensor | None) -> torch.Tensor | None:
    """``B``, or None for an absent or empty (``k = 0``) basis."""
    return None if B is None or B.shape[1] == 0 else B


# --- lists of entries (the grouped ops) -------------------------------------------------------------

def per_entry(value, n: int, name: str, kind) -> list:
    if isinstance(value, kind) and not isinstance(value, (list, tuple)):
        return [value] * n
    if value is None:
        return [None] * n
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple with one entry per tensor, or a single value; "
                        f"got {type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"{name} must have one entry per tensor: expected {n}, got {len(value)}")
    return list(value)


def check_shard(W, U, complement: bool) -> None:
    """A row shard of ``U`` (``rows×k_out``, the rows of ``W``'s shard): its columns are orthonormal
    only across all shards, so only the shape is checked here."""
    check_tensor("U", U, ndim=2)
    check_same_device(W=W, U=U)
    if U.shape[0] != W.shape[0]:
        raise ValueError(f"U (a row shard, U_reduce given) must have {W.shape[0]} rows, the rows of this "
                         f"shard, got shape {tuple(U.shape)}")
    if complement:
        raise ValueError("U_reduce needs U stored as itself, not as its complement")


def entries(Ws, Us, Vs, scales, U_complement, V_complement, what: str, U_sharded: bool = False) -> list:
    """``[[W, U, V, scale, U_complement, V_complement], ...]`` for a grouped op, every argument checked:
    2-D tensors, bases per entry, written tensors disjoint from each other and from every basis."""
    if isinstance(Ws, torch.Tensor) or not isinstance(Ws, (list, tuple)):
        raise TypeError(f"{what} must be a list or tuple of tensors, got {type(Ws).__name__}")
    n = len(Ws)
    Us = [None] * n if Us is None else per_entry(Us, n, "Us", ())
    Vs = [None] * n if Vs is None else per_entry(Vs, n, "Vs", ())
    scales = per_entry(scales, n, "scales", (int, float))
    Uc = per_entry(U_complement, n, "U_complement", bool)
    Vc = per_entry(V_complement, n, "V_complement", bool)
    for name, flags in (("U_complement", Uc), ("V_complement", Vc)):
        for i, f in enumerate(flags):
            if not isinstance(f, bool):
                raise TypeError(f"{name}[{i}] must be a bool, got {type(f).__name__}")
    result = []
    for i, (W, U, V, s) in enumerate(zip(Ws, Us, Vs, scales)):
        try:
            s = residual_project_args(W, None if U_sharded else U, V, s)
            if U_sharded and U is not None:
                check_shard(W, U, Uc[i])
            not_differentiable(U=U, V=V)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{what}[{i}]: {exc}") from None
        if W.dim() != 2:
            raise ValueError(f"{what}[{i}] must be 2-D (out×in), got shape {tuple(W.shape)}")
        result.append([W, U, V, s, Uc[i], Vc[i]])
    bases = [(f"Us[{i}]", e[1]) for i, e in enumerate(result)] + [(f"Vs[{i}]", e[2]) for i, e in enumerate(result)]
    for i, e in enumerate(result):
        W = e[0]
        if has_internal_overlap(W):
            raise ValueError(f"{what}[{i}] has overlapping elements (strides {tuple(W.stride())}); "
                             "it cannot be written in place")
        for j in range(i):
            if may_overlap(W, result[j][0]):
                raise ValueError(f"{what}[{i}] shares memory with {what}[{j}]: each tensor is written in "
                                 "place once, so every entry must be a separate tensor")
        for name, B in bases:
            if B is not None and may_overlap(W, B):
                raise ValueError(f"{what}[{i}] shares memory with {name}: it would be overwritten while read")
    return result


def reference_args(i, W, U, V, uc, vc, W0, anchor, what) -> None:
    """One entry's reference for the constraint restore: exactly one of a full ``W0`` (``W``'s shape,
    disjoint from ``W``) and an ``anchor`` ``(W0V, UtW0)`` whose shapes match the bases."""
    tag = what if i is None else f"{what}[{i}]"
    if (W0 is None) == (anchor is None):
        raise ValueError(f"{tag}: pass exactly one of W0 (a full reference weight) and anchor "
                         f"(thin products from subspace_anchor); got {'both' if W0 is not None else 'neither'}")
    if W0 is not None:
        if not isinstance(W0, torch.Tensor):
            raise TypeError(f"{tag}: W0 must be a torch.Tensor, got {type(W0).__name__}")
        if W0.shape != W.shape or W0.device != W.device or not W0.is_floating_point():
            raise ValueError(f"{tag}: W0 must be a floating-point tensor of W's shape {tuple(W.shape)} on "
                             f"{W.device}, got shape {tuple(W0.shape)}, {W0.dtype} on {W0.device}")
        if may_overlap(W0, W):
            raise ValueError(f"{tag}: W0 shares memory with W; keep a separate copy of the reference")
        return
    if not isinstance(anchor, tuple) or len(anchor) != 2:
        raise TypeError(f"{tag}: anchor must be a SubspaceAnchor (W0V, UtW0), got {type(anchor).__name__}")
    if uc or vc:
        raise ValueError(f"{tag}: a basis stored as its complement has no thin anchor (W₀ times the "
                         "complement's orthogonal space is as large as W₀): pass W0 (the task-start "
                         "weight, or the weight before this step) instead")
    W0V, UtW0 = anchor
    out_dim, in_dim = W.shape
    for name, B, t, shape in (("V", nonempty(V), W0V, None if nonempty(V) is None else (out_dim, V.shape[1])),
                              ("U", nonempty(U), UtW0, None if nonempty(U) is None else (U.shape[1], in_dim))):
        got = None if t is None else tuple(t.shape)
        if shape != got:
            raise ValueError(f"{tag}: anchor.{'W0V' if name == 'V' else 'UtW0'} must be "
                             f"{'None' if shape is None else shape} for this {name}, got {got}; "
                             "recompute the anchor with subspace_anchor after the bases change")
