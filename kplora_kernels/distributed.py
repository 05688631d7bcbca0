"""The two questions every part asks of torch.distributed, answered in one place."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """A process group is up (torchrun, or ``init_process_group`` by the caller)."""
    return dist.is_available() and dist.is_initialized()


def is_rank0() -> bool:
    """Rank 0 of the default group, or any process when not distributed: the one that writes."""
    return not is_distributed() or dist.get_rank() == 0


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
