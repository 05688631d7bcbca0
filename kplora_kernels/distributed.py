"""The two questions every part asks of torch.distributed, answered in one place."""
from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    """A process group is up (torchrun, or ``init_process_group`` by the caller)."""
    return dist.is_available() and dist.is_initialized()


def is_rank0() -> bool:
    """Rank 0 of the default group, or any process when not distributed: the one that writes."""
    return not is_distributed() or dist.get_rank() == 0
