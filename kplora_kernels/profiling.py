"""Measurement helpers for benchmarks and tests."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_activation_bytes(fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensors that autograd saves for backward while ``fn()`` runs its
    forward, leaving out the storages of ``exclude`` (parameters and buffers are not activations)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())
