"""Where the protected bases live between task boundaries (docs/design.md §1, "Task start/end").

With ``A`` frozen and no output basis (the defaults), neither the forward nor the backward of
:class:`~kplora_kernels.nn.FusedKeepLoRALinear` reads ``V``: training needs what plain LoRA needs,
and the bases — 13 GiB in fp32 for LLaVA-1.5-7B at ``k_in = in/2`` — are used only by the task
boundaries (``begin_task``, ``end_task``, ``set_bases``). A :class:`BasisPlacement` keeps them off
the training device in between and brings them back, layer by layer, for a boundary:

- ``"device"``: the bases stay with the weights (no transfers; the behaviour before placements);
- ``"cpu"``: host memory, pinned when CUDA is available (the default for CUDA models), so the copy
  back overlaps with compute on a side stream;
- ``"mmap"``: a safetensors file under ``folder`` (one per rank), memory-mapped (``torch.from_file``), for hosts
  short of RAM; the file is rewritten whenever the bases change.

A layer that reads its bases in every step stays resident, whatever the placement: ``train_A=True``
(``dA`` is projected on ``V``) or an output basis ``U`` (``dB`` is projected on ``U``). Moving a basis
copies it exactly, so results are bit-identical in every placement.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager

import torch
import torch.distributed

from ..distributed import is_distributed

PLACEMENTS = ("device", "cpu", "mmap")
_BASES = ("V", "U")


def needs_bases_in_training(layer) -> bool:
    """True when ``layer``'s forward/backward reads a basis on every step (then it stays resident)."""
    return bool(layer.lora_A.requires_grad and layer.protects_input) or layer.U.shape[1] > 0


class BasisPlacement:
    """Keeps the bases of ``layers`` (``{name: FusedKeepLoRALinear}``) off their device between task
    boundaries.

    Args:
        mode: one of ``"device"``, ``"cpu"``, ``"mmap"`` (see the module docstring).
        folder: for ``"mmap"``, the folder of the file ``bases.safetensors`` (created when missing).

    Raises:
        ValueError: an unknown ``mode``, or ``"mmap"`` without ``folder``.
    """

    def __init__(self, mode: str = "device", folder: str | None = None):
        if mode not in PLACEMENTS:
            raise ValueError(f"placement: expected one of {PLACEMENTS}, got {mode!r}")
        if mode == "mmap" and not folder:
            raise ValueError("folder: the 'mmap' placement needs a folder for its safetensors file, got None")
        self.mode, self.folder = mode, os.fspath(folder) if folder else None
        self._off: set[str] = set()  # the layers whose bases are off their weights' device

    # --- one layer at a time ------------------------------------------------------------------------
    def is_offloaded(self, name: str) -> bool:
        return name in self._off

    def offload(self, layers: dict) -> None:
        """Move the bases of every layer that does not need them in training off its device."""
        if self.mode == "device":
            return
        if self.mode == "cpu" and not any(layer.weight.device.type != "cpu" for layer in layers.values()):
            return  # the training device is the host: nothing to move
        movable = {n: layer for n, layer in layers.items() if not needs_bases_in_training(layer)}
        self._off.update(movable)
        if self.mode == "cpu":
            pin = torch.cuda.is_available()
            for layer in movable.values():
                for key in _BASES:
                    t = getattr(layer, key)
                    if t.device.type != "cpu" or (pin and not t.is_pinned()):
                        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
                        host.copy_(t)
                        setattr(layer, key, host)
        else:
            self._write_mmap(movable)

    def fetch(self, name: str, layer, non_blocking: bool = False) -> None:
        """Bring ``layer``'s bases to the device of its weight — where the weight is now, so a model
        moved after wrapping (``model.cuda()``) is followed (a no-op when they are there)."""
        home = layer.weight.device
        offloaded = name in self._off
        self._off.discard(name)
        for key in _BASES:
            t = getattr(layer, key)
            if offloaded or t.device != home:
                setattr(layer, key, t.to(home, non_blocking=non_blocking and t.is_pinned(), copy=True))

    @contextmanager
    def resident(self, layers: dict):
        """``with placement.resident(layers):`` the bases of ``layers`` are on their device; on exit they
        go back off it (also when the block raises)."""
        try:
            self.fetch_all(layers)
            yield layers
        finally:
            self.offload(layers)

    def fetch_all(self, layers: dict) -> None:
        """Every layer's bases back on its device; on CUDA the copies are queued on a side stream,
        one layer ahead of the next, and the current stream waits for them once."""
        names = [n for n, layer in layers.items()
                 if self.is_offloaded(n) or any(getattr(layer, k).device != layer.weight.device for k in _BASES)]
        if not names:
            return
        cuda = any(layers[n].weight.device.type == "cuda" for n in names)
        if not cuda:
            for n in names:
                self.fetch(n, layers[n])
            return
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for n in names:
                self.fetch(n, layers[n], non_blocking=True)
        torch.cuda.current_stream().wait_stream(stream)

    # --- mmap -----------------------------------------------------------------------------------------
    def _write_mmap(self, movable: dict) -> None:
        from safetensors.torch import save_file

        os.makedirs(self.folder, exist_ok=True)
        rank = torch.distributed.get_rank() if is_distributed() else 0  # one file per rank: no two writers
        path = os.path.join(self.folder, "bases.safetensors" if rank == 0 else f"bases-rank{rank}.safetensors")
        tensors = {f"{n}.{k}": getattr(layer, k).detach().cpu().contiguous()
                   for n, layer in movable.items() for k in _BASES if getattr(layer, k).numel()}
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(tensors, tmp)
        os.replace(tmp, path)
        mapped = _map_safetensors(path)
        for n, layer in movable.items():
            for k in _BASES:
                t = getattr(layer, k)
                setattr(layer, k, mapped.get(f"{n}.{k}", torch.empty(t.shape, dtype=t.dtype)))


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _map_safetensors(path: str) -> dict:
    """The tensors of a safetensors file as read-only views of one memory map of the file (the pages
    are read from disk when touched; nothing is copied into process memory up front)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    size = os.path.getsize(path)
    raw = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
    start = 8 + header_len
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _DTYPES[info["dtype"]]
        lo, hi = info["data_offsets"]
        item = torch.empty((), dtype=dtype).element_size()
        if (start + lo) % item:  # a view needs an aligned offset; copy this one (never happens for fp32 files)
            out[key] = raw[start + lo:start + hi].clone().view(dtype).reshape(info["shape"])
        else:
            out[key] = raw[start + lo:start + hi].view(dtype).reshape(info["shape"])
    return out
