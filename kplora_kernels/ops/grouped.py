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

Registered with ``torch.library``: ``kplora::grouped_projection_``, ``kplora::subspace_anchor`` and
``kplora::constraint_restore_`` (lists of tensors, written in place; not differentiable: they act on
gradients and weights outside autograd). Row shards (``U_reduce``, a Python callable that sums over
the shard group between the two passes) run outside the registered ops, through the same backends;
this is the one row-shard projection and restore: FSDP2's full mode reaches it through
:mod:`kplora_kernels.distributed` (``project_sharded_``, ``sharded_snapshot``, ``restore_sharded_``).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from . import torch_backend, validation
from .dispatch import basis_width, resolve_backend
from .projection import project_into_
from .validation import nonempty


class SubspaceAnchor(NamedTuple):
    """Thin products of the task-start weight ``W₀``: ``W0V = W₀ V`` (``out×k_in``, None without
    ``V``) and ``UtW0 = Uᵀ W₀`` (``k_out×in``, None without ``U``). See :func:`subspace_anchor`."""
    W0V: torch.Tensor | None
    UtW0: torch.Tensor | None


def _entry_backend(e, backend, U_sharded=False) -> str:
    W, U, V, _, uc, vc = e
    return resolve_backend(W, backend, U_complement=uc, V_complement=vc, U_sharded=U_sharded,
                           k_out=basis_width(nonempty(U)), k_in=basis_width(nonempty(V)))


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
            results[i] = torch_backend.left_product(G, U)
    return results


def _check_reduce(U_reduce) -> None:
    if U_reduce is not None and not callable(U_reduce):
        raise TypeError(f"U_reduce must be a callable that sums a list of tensors over the shard group, "
                        f"got {type(U_reduce).__name__}")


# --- the grouped projection -------------------------------------------------------------------------

def _project_grouped_(entries, backend) -> None:
    """Project validated entries ``[G, U, V, scale, U_complement, V_complement]`` in place: the C++
    ones in one call, the Triton ones one launch per group of equal shapes, the rest one by one."""
    backends = [_entry_backend(e, backend) for e in entries]
    Gs, Us, Vs, ss = [], [], [], []
    triton_entries = []
    for e, b in zip(entries, backends):
        if b == "cpp":
            Gs.append(e[0])
            Us.append(nonempty(e[1]))
            Vs.append(nonempty(e[2]))
            ss.append(e[3])
        elif b == "triton":
            triton_entries.append(e)
        else:
            G, U, V, s, uc, vc = e
            project_into_(G, G, U, V, s, b, uc, vc)
    if Gs:
        torch.ops.kplora.residual_project_grouped_(Gs, Us, Vs, ss)
    if triton_entries:
        from . import triton_kernels

        triton_kernels.project_grouped_(triton_entries)


@torch.library.custom_op("kplora::grouped_projection_", mutates_args=("Gs",),
                         schema="(Tensor(a!)[] Gs, Tensor?[] Us, Tensor?[] Vs, float[] scales, bool[] U_complement, "
                                "bool[] V_complement, str? backend) -> ()")
def _grouped_projection_(Gs, Us, Vs, scales, U_complement, V_complement, backend):
    _project_grouped_([list(e) for e in zip(Gs, Us, Vs, scales, U_complement, V_complement)], backend)


@_grouped_projection_.register_fake
def _(Gs, Us, Vs, scales, U_complement, V_complement, backend):
    return None


def _project_sharded_(entries, backends, U_reduce) -> None:
    """Entries whose ``U`` is a row shard: ``UᵀG`` summed over the shard group between the passes."""
    Ps = _reduce(U_reduce, _left_products([(e[0], e[1]) for e in entries], backends))
    groups: dict = {}
    for e, b, P in zip(entries, backends, Ps):
        G, U, V, s, _, vc = e
        if not G.numel():
            continue
        if b == "triton":  # one launch per group of equal shapes
            from . import triton_kernels

            V = nonempty(V)
            key = triton_kernels.group_key(G, G, U, V, False, vc, None, None, P)
            groups.setdefault(key, []).append((G, G, U, V, s, False, vc, None, None, P))
        else:
            project_into_(G, G, U, V, s, b, False, vc, UtD=P)
    for group in groups.values():
        from . import triton_kernels

        triton_kernels.project_group(group)


@torch.compiler.disable  # U_reduce is a Python collective between the passes: run eagerly (a graph break)
def _sharded_grouped_(entries, sharded, backend, U_reduce) -> None:
    """Resolve every entry's backend (forced ones that cannot run raise before any write), then
    project the row-sharded entries; the others are left to the registered op."""
    backends = [_entry_backend(e, backend, U_sharded=sh) for e, sh in zip(entries, sharded)]
    _project_sharded_([e for e, sh in zip(entries, sharded) if sh], [b for b, sh in zip(backends, sharded) if sh],
                      U_reduce)


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
            the shard group, in place (:func:`kplora_kernels.distributed.shard_sum`) or by
            returning the sums. Every rank must call with the same entries in the same order. The
            ``V`` side is row-local. Shards of ``U`` are checked for shape only (their columns are
            orthonormal only together). Not with the C++ kernel (it runs both passes back to back).

    Returns ``Gs`` as a list (the same tensors). Raises ``TypeError``/``ValueError`` naming the entry
    and argument for bad input, before anything is written.
    """
    _check_reduce(U_reduce)
    entries = validation.entries(Gs, Us, Vs, scales, U_complement, V_complement, "Gs",
                                 U_sharded=U_reduce is not None)
    sharded = [U_reduce is not None and nonempty(e[1]) is not None for e in entries]
    if any(sharded):
        _sharded_grouped_(entries, sharded, backend, U_reduce)
        entries = [e for e, sh in zip(entries, sharded) if not sh]
    elif entries and not torch.compiler.is_compiling():  # forced backends that cannot run raise before any write
        for e in entries:
            _entry_backend(e, backend)
    if entries:
        torch.ops.kplora.grouped_projection_(*[[e[j] for e in entries] for j in range(6)], backend)
    return list(Gs)


# --- the anchor and the constraint restore ----------------------------------------------------------

def _anchor_dtype(W0):
    return torch.float32 if W0.dtype in (torch.float16, torch.bfloat16) else W0.dtype


@torch.library.custom_op("kplora::subspace_anchor", mutates_args=(),
                         schema="(Tensor W0, Tensor? U, Tensor? V) -> (Tensor, Tensor)")
def _subspace_anchor(W0, U, V):
    W0V, UtW0 = torch_backend.subspace_anchor(W0, U, V)
    dt = _anchor_dtype(W0)
    if W0V is None:
        W0V = W0.new_empty(W0.shape[0], 0, dtype=dt)
    if UtW0 is None:
        UtW0 = W0.new_empty(0, W0.shape[1], dtype=dt)
    return W0V.contiguous(), UtW0.contiguous()


@_subspace_anchor.register_fake
def _(W0, U, V):
    dt = _anchor_dtype(W0)
    return (W0.new_empty(W0.shape[0], 0 if V is None else V.shape[1], dtype=dt),
            W0.new_empty(0 if U is None else U.shape[1], W0.shape[1], dtype=dt))


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
    validation.entries([W0], [U], [V], 1.0, False, False, "W0", U_sharded=U_reduce is not None)
    U, V = nonempty(U), nonempty(V)
    W0V, UtW0 = torch.ops.kplora.subspace_anchor(W0, U, V)
    W0V = None if V is None else W0V
    UtW0 = None if U is None else UtW0
    if U_reduce is not None and UtW0 is not None:
        UtW0 = _reduce(U_reduce, [UtW0])[0]
    return SubspaceAnchor(W0V, UtW0)


def _restore_sharded_(entries, backends, W0s, anchors, U_reduce) -> None:
    """The restore over row shards: ``Uᵀ(W − W0)`` is summed over the shard group between passes."""
    for e, W0 in zip(entries, W0s):
        if W0 is not None:
            e[0].sub_(W0)
    idx = [i for i, e in enumerate(entries) if nonempty(e[1]) is not None]
    Ps = _reduce(U_reduce, _left_products([(entries[i][0], entries[i][1]) for i in idx], [backends[i] for i in idx]))
    UtDs = dict(zip(idx, Ps))
    for i, (e, b, W0, anchor) in enumerate(zip(entries, backends, W0s, anchors)):
        W, U, V, _, _, vc = e
        GV0 = None if W0 is not None or nonempty(V) is None else anchor[0]
        UtD = UtDs.get(i)
        if UtD is not None and W0 is None:
            UtD = UtD - anchor[1].to(UtD.dtype)
        if W.numel():
            if UtD is None and b == "cpp":
                if GV0 is None:
                    project_into_(W, W, U, V, 1.0, b, False, vc)
                else:
                    torch.ops.kplora.subspace_restore_(W, None, nonempty(V), GV0, None)
            else:
                project_into_(W, W, U, V, 1.0, "triton" if b == "triton" else "torch", False, vc, GV0=GV0, UtD=UtD)
        if W0 is not None:
            W.add_(W0)


@torch.compiler.disable  # U_reduce is a Python collective between the passes: run eagerly (a graph break)
def _restore_sharded_eagerly_(entries, backend, W0s, anchors, U_reduce) -> None:
    backends = [_entry_backend(e, backend, U_sharded=nonempty(e[1]) is not None) for e in entries]
    _restore_sharded_(entries, backends, W0s, anchors, U_reduce)


def _restore_all_(entries, backends, W0s, anchors) -> None:
    """Restore every entry in place; entries with an anchor go to the C++ kernel in one call on CPU
    and to the Triton kernels in one launch per group of equal shapes on CUDA."""
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
        U, V = nonempty(U), nonempty(V)
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


@torch.library.custom_op("kplora::constraint_restore_", mutates_args=("Ws",),
                         schema="(Tensor(a!)[] Ws, Tensor?[] Us, Tensor?[] Vs, Tensor?[] W0s, Tensor?[] W0Vs, "
                                "Tensor?[] UtW0s, bool[] U_complement, bool[] V_complement, str? backend) -> ()")
def _constraint_restore_(Ws, Us, Vs, W0s, W0Vs, UtW0s, U_complement, V_complement, backend):
    entries = [[W, U, V, 1.0, uc, vc] for W, U, V, uc, vc in zip(Ws, Us, Vs, U_complement, V_complement)]
    anchors = [None if W0 is not None else (a, b) for W0, a, b in zip(W0s, W0Vs, UtW0s)]
    _restore_all_(entries, [_entry_backend(e, backend) for e in entries], list(W0s), anchors)


@_constraint_restore_.register_fake
def _(Ws, Us, Vs, W0s, W0Vs, UtW0s, U_complement, V_complement, backend):
    return None


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
    entries = validation.entries(Ws, Us, Vs, 1.0, U_complement, V_complement, _what, U_sharded=U_reduce is not None)
    n = len(entries)
    W0s = [None] * n if W0s is None else validation.per_entry(W0s, n, "W0s", ())
    anchors = [None] * n if anchors is None else validation.per_entry(anchors, n, "anchors", ())
    for i, e in enumerate(entries):
        validation.reference_args(None if _what == "W" else i, e[0], e[1], e[2], e[4], e[5], W0s[i], anchors[i],
                                  _what)
    if U_reduce is not None:
        _restore_sharded_eagerly_(entries, backend, W0s, anchors, U_reduce)
        return list(Ws)
    if entries and not torch.compiler.is_compiling():
        for e in entries:
            _entry_backend(e, backend)
    if entries:
        # the anchor's products for a side without a basis are not used: pass None there
        W0Vs = [None if a is None or nonempty(e[2]) is None else a[0] for e, a in zip(entries, anchors)]
        UtW0s = [None if a is None or nonempty(e[1]) is None else a[1] for e, a in zip(entries, anchors)]
        torch.ops.kplora.constraint_restore_([e[0] for e in entries], [e[1] for e in entries],
                                             [e[2] for e in entries], W0s, W0Vs, UtW0s,
                                             [e[4] for e in entries], [e[5] for e in entries], backend)
    return list(Ws)
