"""Ops of full fine-tuning in the residual subspace (docs/design.md §1): the grouped in-place
gradient projection and the post-step constraint restore.

Training a weight ``W`` (``out×in``) with every update confined to the residual subspace:

1. after each backward, every target gradient ``G`` becomes ``s·(I−UUᵀ) G (I−VVᵀ)`` in place
   (:func:`residual_project_grouped_`, all target weights in as few launches as possible);
2. after each ``optimizer.step()`` the constraint ``(W − W₀) V = 0``, ``Uᵀ (W − W₀) = 0`` is restored
   exactly (:func:`subspace_restore_` / :func:`subspace_restore_grouped_`): Adam's element-wise
   scaling moves ``W`` out of the subspace even when the gradient was projected.

Bases: ``U`` is ``out×k_out``, ``V`` is ``in×k_in`` with orthonormal columns, or None/empty (no
protection on that side); a basis flagged ``*_complement`` spans the kept space instead.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from . import reference
from .dispatch import resolve_backend
from .._checks import check_same_device, check_tensor
from .projection import _nonempty, has_internal_overlap, may_overlap, project_into_


class SubspaceAnchor(NamedTuple):
    """Thin products of the task-start weight ``W₀``: ``W0V = W₀ V`` (``out×k_in``, None without
    ``V``) and ``UtW0 = Uᵀ W₀`` (``k_out×in``, None without ``U``). See :func:`subspace_anchor`."""
    W0V: torch.Tensor | None
    UtW0: torch.Tensor | None


def _per_entry(value, n: int, name: str, kind) -> list:
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


def _entries(Ws, Us, Vs, scales, U_complement, V_complement, what: str, U_sharded: bool = False):
    if isinstance(Ws, torch.Tensor) or not isinstance(Ws, (list, tuple)):
        raise TypeError(f"{what} must be a list or tuple of tensors, got {type(Ws).__name__}")
    n = len(Ws)
    Us = [None] * n if Us is None else _per_entry(Us, n, "Us", ())
    Vs = [None] * n if Vs is None else _per_entry(Vs, n, "Vs", ())
    scales = _per_entry(scales, n, "scales", (int, float))
    Uc = _per_entry(U_complement, n, "U_complement", bool)
    Vc = _per_entry(V_complement, n, "V_complement", bool)
    for name, flags in (("U_complement", Uc), ("V_complement", Vc)):
        for i, f in enumerate(flags):
            if not isinstance(f, bool):
                raise TypeError(f"{name}[{i}] must be a bool, got {type(f).__name__}")
    entries = []
    for i, (W, U, V, s) in enumerate(zip(Ws, Us, Vs, scales)):
        try:
            s = reference.validate_residual_project(W, None if U_sharded else U, V, s)
            if U_sharded and U is not None:
                _check_shard(W, U, Uc[i])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{what}[{i}]: {exc}") from None
        if W.dim() != 2:
            raise ValueError(f"{what}[{i}] must be 2-D (out×in), got shape {tuple(W.shape)}")
        entries.append([W, U, V, s, Uc[i], Vc[i]])
    # written tensors must be disjoint from each other and from every basis (bases may be shared)
    bases = [(f"Us[{i}]", e[1]) for i, e in enumerate(entries)] + [(f"Vs[{i}]", e[2]) for i, e in enumerate(entries)]
    for i, e in enumerate(entries):
        W = e[0]
        if has_internal_overlap(W):
            raise ValueError(f"{what}[{i}] has overlapping elements (strides {tuple(W.stride())}); "
                             "it cannot be written in place")
        for j in range(i):
            if may_overlap(W, entries[j][0]):
                raise ValueError(f"{what}[{i}] shares memory with {what}[{j}]: each tensor is written in "
                                 "place once, so every entry must be a separate tensor")
        for name, B in bases:
            if B is not None and may_overlap(W, B):
                raise ValueError(f"{what}[{i}] shares memory with {name}: it would be overwritten while read")
    return entries


def _check_shard(W, U, complement: bool) -> None:
    """A row shard of ``U`` (``rows×k_out``, the rows of ``W``'s shard): its columns are orthonormal
    only across all shards, so only the shape is checked here."""
    check_tensor("U", U, ndim=2)
    check_same_device(W=W, U=U)
    if U.shape[0] != W.shape[0]:
        raise ValueError(f"U (a row shard, U_reduce given) must have {W.shape[0]} rows, the rows of this "
                         f"shard, got shape {tuple(U.shape)}")
    if complement:
        raise ValueError("U_reduce needs U stored as itself, not as its complement")


def _reduce(U_reduce, Ps: list) -> list:
    """Sum the products over the shards through the caller's ``U_reduce`` (in place, or returned)."""
    result = U_reduce(Ps)
    if result is None:
        return Ps
    result = list(result)
    if len(result) != len(Ps) or any(not isinstance(r, torch.Tensor) or r.shape != P.shape
                                      for r, P in zip(result, Ps)):
        raise ValueError(f"U_reduce must reduce its list of UᵀG products in place (return None) or return "
                         f"tensors of the same shapes {[tuple(P.shape) for P in Ps]}")
    return result


def _left_products(pairs, backends) -> list:
    """``[Uᵢᵀ Gᵢ]`` (``k_out×in``; float32 for half precision) for pass 1 of a sharded projection."""
    results = [None] * len(pairs)
    tri = [i for i, b in enumerate(backends) if b == "triton"]
    if tri:
        from . import triton_kernels

        for i, P in zip(tri, triton_kernels.left_products([pairs[i][0] for i in tri], [pairs[i][1] for i in tri])):
            results[i] = P
    for i, (G, U) in enumerate(pairs):
        if results[i] is None:
            wd = torch.float32 if G.dtype in (torch.float16, torch.bfloat16) else G.dtype
            results[i] = U.to(wd).mT @ G.to(wd)
    return results


def _check_reduce(U_reduce) -> None:
    if U_reduce is not None and not callable(U_reduce):
        raise TypeError(f"U_reduce must be a callable that sums a list of tensors over the shard group, "
                        f"got {type(U_reduce).__name__}")


def _cpp_grouped_(entries, backends) -> list:
    """Run the entries the C++ backend takes in one call; returns the others."""
    rest, Gs, Us, Vs, ss = [], [], [], [], []
    for e, b in zip(entries, backends):
        if b == "cpp":
            Gs.append(e[0])
            Us.append(_nonempty(e[1]))
            Vs.append(_nonempty(e[2]))
            ss.append(e[3])
        else:
            rest.append((e, b))
    if Gs:
        torch.ops.kplora.residual_project_grouped_(Gs, Us, Vs, ss)
    return rest


def residual_project_grouped_(Gs: Sequence[torch.Tensor], Us=None, Vs=None, scales=1.0, *,
                              U_complement=False, V_complement=False, backend: str | None = None,
                              U_reduce=None) -> list:
    """Replace every ``Gs[i]`` (``out×in``) in place by ``scales[i]·(I − UᵢUᵢᵀ) Gᵢ (I − VᵢVᵢᵀ)``.

    The step of full fine-tuning in the residual subspace that follows each backward (docs/design.md
    §1), for all target gradients at once: on CPU the C++ kernel takes the whole list in one call;
    on CUDA the Triton kernel takes each group of same-shaped, same-rank entries in one launch (as
    the ``torch._foreach_*`` optimizers do). No ``out×in`` temporary is allocated (only thin ones:
    ``out×k_in``, ``k_out×in``).

    Args:
        Gs: list of 2-D tensors ``out×in`` (shapes may differ), each written in place; no two may
            share memory, and none may share memory with a basis.
        Us, Vs: lists of bases (``out×k_out`` / ``in×k_in``, orthonormal columns) or None entries;
            None for the whole list means no basis on that side. Bases may be shared between entries.
        scales: one float for all, or a list (the layer scales ``s_l``).
        U_complement, V_complement: one bool or a list; True when that basis spans the kept space.
        backend: None (by device), ``"torch"``, ``"cpp"`` or ``"triton"`` (forced for every entry;
            raises ``ValueError`` with the reasons when it cannot run one).
        U_reduce: for row-sharded tensors (FSDP2 ``Shard(0)``: each rank holds rows of ``G`` and the
            same rows of ``U``): a callable that sums a list of ``k_out×in`` products ``UᵀG`` over
            the shard group, in place (e.g. ``lambda Ps: [dist.all_reduce(P) for P in Ps]``) or by
            returning the sums. Every rank must call with the same entries in the same order. The
            ``V`` side is row-local. Shards of ``U`` are checked for shape only (their columns are
            orthonormal only together). Not with the C++ kernel (it runs both passes back to back).

    Returns ``Gs`` as a list (the same tensors). Raises ``TypeError``/``ValueError`` naming the entry
    and argument for bad input, before anything is written.
    """
    _check_reduce(U_reduce)
    entries = _entries(Gs, Us, Vs, scales, U_complement, V_complement, "Gs", U_sharded=U_reduce is not None)
    sharded = [U_reduce is not None and _nonempty(e[1]) is not None for e in entries]
    backends = [resolve_backend(e[0], backend, U_complement=e[4], V_complement=e[5], U_sharded=sh)
                for e, sh in zip(entries, sharded)]
    if U_reduce is not None:
        idx = [i for i, sh in enumerate(sharded) if sh]
        Ps = _reduce(U_reduce, _left_products([(entries[i][0], entries[i][1]) for i in idx], [backends[i] for i in idx]))
        sharded_groups: dict = {}
        for i, P in zip(idx, Ps):
            G, U, V, s, _, vc = entries[i]
            if not G.numel():
                continue
            if backends[i] == "triton":  # one launch per group of equal shapes
                from . import triton_kernels

                V = _nonempty(V)
                key = triton_kernels.group_key(G, G, U, V, False, vc, None, None, P)
                sharded_groups.setdefault(key, []).append((G, G, U, V, s, False, vc, None, None, P))
            else:
                project_into_(G, G, U, V, s, backends[i], False, vc, UtD=P)
        for group in sharded_groups.values():
            from . import triton_kernels

            triton_kernels.project_group(group)
        entries = [e for e, sh in zip(entries, sharded) if not sh]
        backends = [b for b, sh in zip(backends, sharded) if not sh]
    rest = _cpp_grouped_(entries, backends)
    triton_groups: dict = {}
    for e, b in rest:
        if b == "triton":
            triton_groups.setdefault(None, []).append(e)
        elif e[0].numel():
            G, U, V, s, uc, vc = e
            project_into_(G, G, U, V, s, b, uc, vc)
    for group in triton_groups.values():
        from . import triton_kernels

        triton_kernels.project_grouped_(group)
    return list(Gs)


def subspace_anchor(W0: torch.Tensor, U: torch.Tensor | None = None, V: torch.Tensor | None = None, *,
                    U_reduce=None) -> SubspaceAnchor:
    """The thin products of the task-start weight ``W₀`` (``out×in``) that
    :func:`subspace_restore_` needs instead of ``W₀`` itself: ``W₀V`` (``out×k_in``) and ``UᵀW₀``
    (``k_out×in``), float32 for a half-precision ``W₀`` (``W V`` and ``W₀ V`` nearly cancel in the
    restore). Memory: ``(out·k_in + k_out·in)`` elements instead of ``out·in``. Thin products exist
    only for bases stored as themselves; for a complement basis keep a full reference (see
    :func:`subspace_restore_`). With ``U_reduce`` (row shards, see :func:`residual_project_grouped_`)
    ``W0`` and ``U`` are this rank's rows: ``W0V`` is this rank's rows, ``UtW0`` the full sum.
    Raises as :func:`residual_project` does for bad bases."""
    _check_reduce(U_reduce)
    e = _entries([W0], [U], [V], 1.0, False, False, "W0", U_sharded=U_reduce is not None)[0]
    W0V, UtW0 = reference.subspace_anchor(W0, _nonempty(U), _nonempty(V))
    if U_reduce is not None and UtW0 is not None:
        UtW0 = _reduce(U_reduce, [UtW0])[0]
    del e
    return SubspaceAnchor(W0V, UtW0)


def _check_reference(i, W, U, V, uc, vc, W0, anchor, what):
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
    for name, B, t, shape in (("V", _nonempty(V), W0V, None if _nonempty(V) is None else (out_dim, V.shape[1])),
                              ("U", _nonempty(U), UtW0, None if _nonempty(U) is None else (U.shape[1], in_dim))):
        got = None if t is None else tuple(t.shape)
        if shape != got:
            raise ValueError(f"{tag}: anchor.{'W0V' if name == 'V' else 'UtW0'} must be "
                             f"{'None' if shape is None else shape} for this {name}, got {got}; "
                             "recompute the anchor with subspace_anchor after the bases change")


def _restore_sharded_(entries, backends, W0s, anchors, U_reduce) -> None:
    """The restore over row shards: ``Uᵀ(W − W0)`` is summed over the shard group between passes."""
    for e, W0 in zip(entries, W0s):
        if W0 is not None:
            e[0].sub_(W0)
    idx = [i for i, e in enumerate(entries) if _nonempty(e[1]) is not None]
    Ps = _reduce(U_reduce, _left_products([(entries[i][0], entries[i][1]) for i in idx], [backends[i] for i in idx]))
    UtDs = dict(zip(idx, Ps))
    for i, (e, b, W0, anchor) in enumerate(zip(entries, backends, W0s, anchors)):
        W, U, V, _, _, vc = e
        GV0 = None if W0 is not None or _nonempty(V) is None else anchor[0]
        UtD = UtDs.get(i)
        if UtD is not None and W0 is None:
            UtD = UtD - anchor[1].to(UtD.dtype)
        if W.numel():
            if UtD is None and b == "cpp":
                if GV0 is None:
                    project_into_(W, W, U, V, 1.0, b, False, vc)
                else:
                    torch.ops.kplora.subspace_restore_(W, None, _nonempty(V), GV0, None)
            else:
                project_into_(W, W, U, V, 1.0, "triton" if b == "triton" else "torch", False, vc, GV0=GV0, UtD=UtD)
        if W0 is not None:
            W.add_(W0)


def _restore_all_(entries, backends, W0s, anchors, U_reduce=None) -> None:
    """Restore every entry in place; entries with an anchor go to the C++ kernel in one call on CPU
    and to the Triton kernels in one launch per group of equal shapes on CUDA."""
    if U_reduce is not None:
        _restore_sharded_(entries, backends, W0s, anchors, U_reduce)
        return
    cpp_lists = ([], [], [], [], [])
    triton_groups: dict = {}
    for e, b, W0, anchor in zip(entries, backends, W0s, anchors):
        W, U, V, _, uc, vc = e
        if W.numel() == 0:
            continue
        if W0 is not None:
            # W ← W0 + P(W − W0): in place, no temporary of W's size
            W.sub_(W0)
            project_into_(W, W, U, V, 1.0, b, uc, vc)
            W.add_(W0)
            continue
        U, V = _nonempty(U), _nonempty(V)
        GV0 = None if V is None else anchor[0]
        UtG0 = None if U is None else anchor[1]
        if b == "cpp":
            for lst, item in zip(cpp_lists, (W, U, V, GV0, UtG0)):
                lst.append(item)
        elif b == "triton":
            from . import triton_kernels

            key = triton_kernels.group_key(W, W, U, V, False, False, GV0, UtG0)
            triton_groups.setdefault(key, []).append((W, W, U, V, 1.0, False, False, GV0, UtG0))
        else:
            project_into_(W, W, U, V, 1.0, "torch", False, False, GV0=GV0, UtG0=UtG0)
    if cpp_lists[0]:
        torch.ops.kplora.subspace_restore_grouped_(*cpp_lists)
    for group in triton_groups.values():
        from . import triton_kernels

        triton_kernels.project_group(group)


def subspace_restore_(W: torch.Tensor, U: torch.Tensor | None = None, V: torch.Tensor | None = None, *,
                      W0: torch.Tensor | None = None, anchor: SubspaceAnchor | None = None,
                      U_complement: bool = False, V_complement: bool = False,
                      backend: str | None = None, U_reduce=None) -> torch.Tensor:
    """Restore the constraint of full fine-tuning after an optimizer step, in place:
    ``W ← W₀ + (I − UUᵀ)(W − W₀)(I − VVᵀ)``, so that ``(W − W₀) V = 0`` and ``Uᵀ (W − W₀) = 0`` hold
    to the rounding of ``W``'s dtype (docs/design.md §1; the part of the step inside the protected
    subspaces is removed, the rest is kept). Returns ``W``.

    ``W``: ``out×in``, modified in place; ``U``: ``out×k_out``, ``V``: ``in×k_in`` (or None/empty).
    Give the reference in one of two forms:

    * ``anchor=subspace_anchor(W₀, U, V)`` (bases stored as themselves): the thin products ``W₀V``
      and ``UᵀW₀`` replace ``W₀``; the restore is the rank-(k_out+k_in) update ``W ← W − L R`` of the
      projection kernels with an offset (``Q = WV − W₀V``, ``P = UᵀW − UᵀW₀``, ``L = [U, Q − U(PV)]``,
      ``R = [P; Vᵀ]``): the C++ tile pass on CPU, the fused Triton row kernel on CUDA. Extra memory:
      the anchor, ``out·k_in + k_out·in`` elements per weight (float32 for half-precision weights),
      and thin temporaries of that size.
    * ``W0=`` a full tensor: ``W ← ((W − W₀) projected) + W₀`` computed in place (no temporary of
      ``W``'s size; the reference itself costs one ``out×in`` copy). This is the form for bases
      stored as their complement, whose thin products would be as large as ``W₀``. The reference
      need not be the task-start weight: when the constraint held before the step, the weight
      *before this step* gives the same result (``P`` is linear and fixes ``W_prev − W₀``), so a
      trainer may snapshot each weight just before its step, one weight at a time, and drop the
      snapshot after the restore: the extra memory is then one weight, not all of them.

    Row shards (FSDP2): pass ``U_reduce`` as for :func:`residual_project_grouped_`, this rank's rows
    of ``W``, ``U`` and ``W0`` (or the anchor from :func:`subspace_anchor` with the same ``U_reduce``).

    Raises ``TypeError``/``ValueError`` naming the argument for bad input (both or neither of
    ``W0``/``anchor``, an anchor that does not match the bases, a complement basis with an anchor).
    """
    subspace_restore_grouped_([W], [U], [V], W0s=None if W0 is None else [W0],
                              anchors=None if anchor is None else [anchor], U_complement=U_complement,
                              V_complement=V_complement, backend=backend, U_reduce=U_reduce, _what="W")
    return W


def subspace_restore_grouped_(Ws: Sequence[torch.Tensor], Us=None, Vs=None, *, W0s=None, anchors=None,
                              U_complement=False, V_complement=False, backend: str | None = None,
                              U_reduce=None, _what: str = "Ws") -> list:
    """:func:`subspace_restore_` over a list of weights (``W0s`` or ``anchors``: one entry per
    weight, None entries allowed in one list when the other gives that entry). All arguments are
    checked before any weight is written. Returns ``Ws`` as a list."""
    _check_reduce(U_reduce)
    entries = _entries(Ws, Us, Vs, 1.0, U_complement, V_complement, _what, U_sharded=U_reduce is not None)
    n = len(entries)
    W0s = [None] * n if W0s is None else _per_entry(W0s, n, "W0s", ())
    anchors = [None] * n if anchors is None else _per_entry(anchors, n, "anchors", ())
    for i, e in enumerate(entries):
        _check_reference(None if _what == "W" else i, e[0], e[1], e[2], e[4], e[5], W0s[i], anchors[i], _what)
    backends = [resolve_backend(e[0], backend, U_complement=e[4], V_complement=e[5],
                                U_sharded=U_reduce is not None and _nonempty(e[1]) is not None) for e in entries]
    _restore_all_(entries, backends, W0s, anchors, U_reduce)
    return list(Ws)
