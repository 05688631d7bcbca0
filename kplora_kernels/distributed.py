"""Every collective, the rank/world arithmetic and the DTensor/FSDP2 helpers of the package.

What each engine sees of a wrapped model:

- DDP: parameters are the adapters' trainable factors, fixed at wrap time by the method (``B``;
  ``A`` when the method trains it), or the target weights with ``adapter="full"``. Buffers: none of
  the bases: ``V``/``U`` are plain layer attributes (serialised by ``state_dict`` hooks), so
  ``broadcast_buffers`` sends 0 basis bytes per forward; at construction DDP broadcasts parameters.
- FSDP2: ``fully_shard`` manages and shards the parameters and moves managed buffers; the bases are
  neither, so they stay where the placement put them. Whole tensors are gathered by :func:`full`.
- The Trainer builds its optimizer from ``requires_grad`` before ``on_train_begin``: it sees the
  trainable set fixed at wrap time.

Collectives the library itself issues: the sketches' sums at task boundaries
(:func:`all_reduce_sum_`); rank 0's ``A`` and bases broadcast at boundaries
(:func:`broadcast_from_rank0`); ``principal_bases``' one broadcast per weight from the rank that
decomposed it (:func:`broadcast_from`); in full mode under FSDP2 one ``UᵀG`` all-reduce per weight
per step and one for the restore (:func:`project_sharded_`, :func:`restore_sharded_`); a barrier
at save (:func:`barrier`). Only torch is imported at module level (no import cycles).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """A process group is up (torchrun, or ``init_process_group`` by the caller)."""
    return dist.is_available() and dist.is_initialized()


def is_rank0() -> bool:
    """Rank 0 of the default group, or any process when not distributed: the one that writes."""
    return not is_distributed() or dist.get_rank() == 0


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 when not distributed)."""
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group=None) -> int:
    """The number of ranks in ``group`` (1 when not distributed)."""
    return dist.get_world_size(group) if is_distributed() else 1


def global_rank(group, local: int) -> int:
    """The global rank of ``group``'s rank ``local`` (``local`` itself for the default group)."""
    return dist.get_global_rank(group, local) if group is not None else local


def barrier(group=None) -> None:
    """Wait until every rank of ``group`` reaches this call (a no-op when not distributed)."""
    if is_distributed():
        dist.barrier(group=group)


def all_reduce_sum_(tensors, group=None) -> None:
    """Sum each tensor over ``group`` in place (a no-op when not distributed)."""
    if not is_distributed():
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def broadcast_from_rank0(t: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank gets ``group``'s rank 0's tensor (shapes may differ before: they are sent first), so
    that bases and adapters are identical everywhere even if decompositions round differently;
    ``t`` itself when not distributed."""
    if not is_distributed():
        return t
    return broadcast_from(t, global_rank(group, 0), group)


def broadcast_from(t: "torch.Tensor | None", src: int, group=None, *, device=None, dtype=None) -> "torch.Tensor":
    """Rank ``src``'s tensor on every rank of ``group`` (``src`` a global rank). Shapes may differ
    between ranks (a kept count, a grown basis): the shape is sent first. A rank without a tensor of
    its own passes None with the ``device`` and ``dtype`` to receive into."""
    shape = [list(t.shape) if t is not None else None]
    dist.broadcast_object_list(shape, src=src, group=group)
    if t is not None and list(t.shape) == shape[0]:
        out = t.contiguous()
    elif t is not None:
        out = t.new_empty(shape[0])
    else:
        out = torch.empty(shape[0], device=device, dtype=dtype)
    dist.broadcast(out, src=src, group=group)
    return out


# --- DTensor (FSDP2) ------------------------------------------------------------------------------

def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from its shards for a DTensor (FSDP2; a collective: every rank
    must call it), the tensor itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def assign_(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param ← value`` for a whole ``value``, which a DTensor parameter keeps only its shard of
    (``value`` must be the same on every rank)."""
    value = value.to(dtype=param.dtype, device=param.device)
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, param.device_mesh, param.placements)
    param.copy_(value)


@torch.no_grad()
def add_(param: torch.Tensor, delta: torch.Tensor) -> None:
    """``param ← param + delta`` with the arithmetic of ``assign_(param, full(param).to(delta.dtype) +
    delta)``: in place (no whole-weight temporary and copy) where ``param`` is a plain tensor of
    ``delta``'s dtype and device, through that form otherwise (a DTensor, or a weight kept in another
    dtype, which is rounded once)."""
    if hasattr(param, "device_mesh") or param.dtype != delta.dtype or param.device != delta.device:
        assign_(param, full(param).to(delta.dtype) + delta)
    else:
        param.add_(delta)


# --- FSDP2 row shards (Shard(0)): the one projection and restore ------------------------------------

def row_shard(t, name: str = "weight"):
    """``(local rows, first row's global index, process group)`` of a DTensor sharded ``Shard(0)`` on a
    1-D mesh (FSDP2's layout); raises ``NotImplementedError`` for any other layout."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise NotImplementedError(f"adapter='full' supports sharded weights only as FSDP2 row shards (Shard(0) on "
                                  f"a 1-D mesh); {name} has placements {tuple(t.placements)} on a "
                                  f"{t.device_mesh.ndim}-D mesh")
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), int(offset[0]), t.device_mesh.get_group()


def shard_sum(group):
    """The ``U_reduce`` of the grouped ops for ``group``: sums a list of ``UᵀG`` products in place."""
    return lambda Ps: all_reduce_sum_(Ps, group)


@torch.no_grad()
def sharded_snapshot(W, U, V, complement: bool) -> dict:
    """The task-start reference of a row-sharded weight ``W`` (a DTensor): this rank's rows of ``W₀V``
    (row-local) and the whole ``UᵀW₀`` (``k_out×in``, summed over the shards), or this rank's rows of
    ``W₀`` for a complement ``V``. The keys are those of the unsharded snapshot."""
    from .ops import subspace_anchor

    if U is None and V is None:
        return {}
    W, off, group = row_shard(W)
    if complement:
        return {"W0": W.clone()}
    U_l = None if U is None else U[off:off + W.shape[0]]
    anchor = subspace_anchor(W, U_l, V, U_reduce=shard_sum(group))
    return {k: t for k, t in anchor._asdict().items() if t is not None}


@torch.no_grad()
def project_sharded_(G, U, V, complement: bool, scale: float) -> None:
    """``G ← s·(I−UUᵀ)G(I−VVᵀ)`` for a row-sharded gradient, through the grouped op's row-shard path:
    the ``V`` side on the local rows, ``UᵀG`` (``k_out×in``) summed over the shard group."""
    from .ops import residual_project_grouped_

    G_l, off, group = row_shard(G, "weight.grad")
    U_l = None if U is None else U[off:off + G_l.shape[0]]
    residual_project_grouped_([G_l], [U_l], [V], [scale], V_complement=[complement], U_reduce=shard_sum(group))


@torch.no_grad()
def restore_sharded_(W, U, V, complement: bool, snap: dict) -> None:
    """``W ← W₀ + (I−UUᵀ)(W − W₀)(I−VVᵀ)`` for a row-sharded weight from its :func:`sharded_snapshot`,
    through the grouped op's row-shard path (one ``k_out×in`` all-reduce for the ``U`` side)."""
    from .ops import SubspaceAnchor, subspace_restore_grouped_

    W_l, off, group = row_shard(W)
    U_l = None if U is None else U[off:off + W_l.shape[0]]
    W0 = snap.get("W0")
    anchor = None if W0 is not None else SubspaceAnchor(snap.get("W0V"), snap.get("UtW0"))
    subspace_restore_grouped_([W_l], [U_l], [V], W0s=[W0], anchors=[anchor], V_complement=[complement],
                              U_reduce=shard_sum(group))


# --- the commands' process group and engines -------------------------------------------------------

def init_from_env(device_arg: str | None) -> torch.device:
    """Under torchrun (``WORLD_SIZE`` > 1) join the process group (nccl on GPUs, else gloo) and
    return this rank's device (``cuda:LOCAL_RANK``, or ``device_arg`` when given)."""
    import os

    cuda = torch.cuda.is_available() and device_arg != "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = torch.device(device_arg or f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
        return device
    return torch.device(device_arg or "cpu")


def rank_shard(items: list) -> list:
    """This rank's equal share of ``items`` (every rank gets as many: each batch is a collective);
    ``items`` itself when not distributed."""
    if not is_distributed():
        return items
    world = world_size()
    return items[: len(items) // world * world][rank()::world]


def data_parallel(model: torch.nn.Module, strategy: str, device: torch.device, blocks=None) -> torch.nn.Module:
    """The module to train through: ``model`` itself when not distributed; with ``strategy="ddp"`` a
    ``DistributedDataParallel`` (the bases are not module state: nothing of them is broadcast); with
    ``"fsdp2"`` ``model`` after ``fully_shard`` of every module whose name ``blocks`` (a compiled
    pattern) fully matches, then of the root (the bases stay where the placement put them).

    Raises:
        ValueError: ``strategy`` is neither ``"ddp"`` nor ``"fsdp2"`` (checked with or without
            ``torch.distributed``).
    """
    if strategy not in ("ddp", "fsdp2"):
        raise ValueError(f"strategy: expected 'ddp' or 'fsdp2', got {strategy!r}")
    if not is_distributed():
        return model
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size(),))
        for name, module in model.named_modules():
            if blocks is not None and blocks.fullmatch(name):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)
