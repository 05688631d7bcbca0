"""Where the protected bases live between task boundaries (docs/design.md, "Where the bases live").

With ``A`` frozen and no output basis (the defaults), neither the forward nor the backward of
:class:`~kplora_kernels.nn.FusedKeepLoRALinear` reads ``V``: training needs what plain LoRA needs,
and the bases — 13 GiB in fp32 for LLaVA-1.5-7B at ``k_in = in/2`` — are used only by the task
boundaries (``begin_task``, ``end_task``, ``set_bases``). A :class:`BasisPlacement` keeps them off
the training device in between and brings them back, layer by layer, for a boundary:

- ``"device"``: the bases stay with the weights (no transfers; the behaviour before placements);
- ``"cpu"``: host memory, pinned when CUDA is available (the default for CUDA models), so the copy
  back overlaps with compute on a side stream;
- ``"mmap"``: one safetensors file per layer under ``folder`` (``rank<process rank>/<layer path>.safetensors``),
  memory-mapped (``torch.from_file``), for hosts short of RAM: a layer whose bases change is written
  to its own file when it is put back, so the host never holds more than that layer's bases. The
  prefetch reads from the page cache, not pinned memory, so on CUDA its copy does not overlap compute
  the way the ``"cpu"`` placement's does. A file is replaced (``os.replace``) while views of the old
  one may still be mapped: fine on Linux and macOS, refused by Windows.

A layer that reads its bases in every step stays resident, whatever the placement: ``train_A=True``
(``dA`` is projected on ``V``) or an output basis ``U`` (``dB`` is projected on ``U``). Moving a basis
copies it exactly, so results are bit-identical in every placement.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager

import torch

from ..distributed import rank as this_rank

PLACEMENTS = ("device", "cpu", "mmap")
_BASES = ("V", "U")


def needs_bases_in_training(layer) -> bool:
    """True when ``layer``'s forward/backward reads a basis on every step (then it stays resident)."""
    return bool(layer.lora_A.requires_grad and layer.protects_input) or layer.U.shape[1] > 0


class BasisPlacement:
    """Keeps the bases of ``layers`` (``{name: FusedKeepLoRALinear}``) off their device between task
    boundaries, and brings them back one layer at a time during a boundary (:meth:`stream`).

    Args:
        mode: one of ``"device"``, ``"cpu"`` (default, as ``KeepLoRA``'s), ``"mmap"`` (see the module
            docstring).
        folder: for ``"mmap"`` only, the folder of the per-layer files
            (``rank<process rank>/<layer path>.safetensors``; created when missing).

    ``resident_layers`` counts the layers whose bases are on the device now although the placement
    keeps them off it (fetched or being prefetched); ``max_resident_layers`` the most at once so far
    (a boundary's basis footprint is that many layers' bases).

    Raises:
        ValueError: an unknown ``mode``; ``"mmap"`` without ``folder`` (or with a file there); a
            ``folder`` for another mode.
        TypeError: ``folder`` is not a path.
    """

    def __init__(self, mode: str = "cpu", folder: "str | os.PathLike | None" = None):
        if not isinstance(mode, str) or mode not in PLACEMENTS:
            raise ValueError(f"placement: expected one of {PLACEMENTS} (or a BasisPlacement), got {mode!r}")
        if folder is not None and not isinstance(folder, (str, os.PathLike)):
            raise TypeError(f"folder: expected a str or os.PathLike, got {type(folder).__name__} {folder!r}")
        if mode != "mmap" and folder is not None:
            raise ValueError(f"folder: only the 'mmap' placement uses a folder, got folder={os.fspath(folder)!r} "
                             f"with {mode!r}")
        if mode == "mmap" and (folder is None or not os.fspath(folder)):
            raise ValueError(f"folder: the 'mmap' placement needs a folder for its per-layer safetensors files, "
                             f"got {folder!r}")
        if folder is not None and os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"folder: expected a folder for the 'mmap' placement, got the file {os.fspath(folder)!r}")
        self.mode, self.folder = mode, os.fspath(folder) if folder is not None else None
        self._off: set[str] = set()  # the layers whose bases are off their weights' device
        # name → {key: (the device copy handed out, the off-device tensor it came from)}
        self._fetched: dict[str, dict] = {}
        self._prefetched: dict[str, tuple] = {}  # name → ({key: device copy}, CUDA event)
        self._mapped: dict[str, dict] = {}  # mmap: name → {key: the view of the layer's file}
        self._streams: dict = {}  # CUDA device → the side stream of its prefetches
        self.resident_layers = self.max_resident_layers = 0

    # --- one layer at a time ------------------------------------------------------------------------
    def is_offloaded(self, name: str) -> bool:
        return name in self._off

    def _moves(self, layer) -> bool:
        """Whether this placement keeps ``layer``'s bases off its device."""
        if self.mode == "device" or needs_bases_in_training(layer):
            return False
        return self.mode == "mmap" or layer.weight.device.type != "cpu"  # "cpu" on a host model: already there

    def _count(self, delta: int) -> None:
        self.resident_layers += delta
        self.max_resident_layers = max(self.max_resident_layers, self.resident_layers)

    def release(self, name: str, layer) -> None:
        """Put ``layer``'s bases back off its device (a no-op for layers that stay resident). Bases
        that were fetched and not changed return to their off-device copy without a transfer; changed
        ones (``set_bases`` at a task end) are copied off (``"mmap"``: written to the layer's file)."""
        fetched = self._fetched.pop(name, None)
        if fetched is not None or name in self._prefetched:
            self._count(-1)
        self._prefetched.pop(name, None)
        if not self._moves(layer):  # it reads its bases in training (now): they belong on its device
            home = layer.weight.device
            for key in _BASES:
                t = getattr(layer, key)
                if name in self._off or t.device != home:
                    setattr(layer, key, t.to(home, copy=True))
            self._off.discard(name)
            self._mapped.pop(name, None)
            return
        pin = self.mode == "cpu" and torch.cuda.is_available()
        changed = False
        for key in _BASES:
            t = getattr(layer, key)
            if fetched is not None and t is fetched[key][0]:
                t = fetched[key][1]  # unchanged: its off-device copy is still right (if it is off the device:
                setattr(layer, key, t)  # a model.to(cuda) after wrapping moved it, then it is copied off below)
            if self.mode == "cpu" and t.device.type == "cpu" and (t.is_pinned() or not pin):
                continue  # already in host memory
            if self.mode == "mmap" and t is self._mapped.get(name, {}).get(key):
                continue  # already the view of the file
            if self.mode == "mmap":
                changed = True
                continue
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            host.copy_(t)
            setattr(layer, key, host)
        if changed:
            self._write_mmap(name, layer)
        self._off.add(name)

    def offload(self, layers: dict) -> None:
        """Move the bases of every layer of ``layers`` that does not need them in training off its
        device, and bring back those of layers that now do (``train_A`` switched on, an output basis
        set); all at once, see :meth:`stream` for one at a time."""
        for name, layer in layers.items():
            self.release(name, layer)

    def fetch(self, name: str, layer, non_blocking: bool = False) -> None:
        """Bring ``layer``'s bases to the device of its weight — where the weight is now, so a model
        moved after wrapping (``model.cuda()``) is followed (a no-op when they are there)."""
        home = layer.weight.device
        offloaded = name in self._off
        self._off.discard(name)
        pending = self._prefetched.pop(name, None)  # queued by prefetch on a side stream (counted there)
        if pending is not None:
            copies, event = pending
            current = torch.cuda.current_stream(home)
            current.wait_event(event)
            for t in copies.values():
                t.record_stream(current)
        else:
            copies = {}
            for key in _BASES:
                t = getattr(layer, key)
                copies[key] = (t.to(home, non_blocking=non_blocking and t.is_pinned(), copy=True)
                               if offloaded or t.device != home else t)
        if offloaded and name not in self._fetched:
            if pending is None:
                self._count(1)
            self._fetched[name] = {k: (copies[k], getattr(layer, k)) for k in _BASES}
        for key in _BASES:
            setattr(layer, key, copies[key])

    def prefetch(self, name: str, layer) -> None:
        """Start bringing ``layer``'s bases to its CUDA device on a side stream (a no-op elsewhere:
        on the host a copy cannot overlap anything); :meth:`fetch` then waits for it."""
        home = layer.weight.device
        if home.type != "cuda" or name not in self._off or name in self._prefetched:
            return
        stream = self._streams.get(home)
        if stream is None:
            stream = self._streams[home] = torch.cuda.Stream(home)
        stream.wait_stream(torch.cuda.current_stream(home))
        with torch.cuda.stream(stream):
            copies = {k: getattr(layer, k).to(home, non_blocking=True, copy=True) for k in _BASES}
            event = torch.cuda.Event()
            event.record(stream)
        self._prefetched[name] = (copies, event)
        self._count(1)

    def stream(self, layers: dict):
        """Iterate ``(name, layer)`` over ``layers`` with that layer's bases on its device, one layer at
        a time: each is put back off the device (:meth:`release`) before the next is handed out,
        while the next one's copy is already under way (CUDA: a side stream, one layer ahead). So a
        boundary holds at most two layers' bases on the device. Changed bases go off the device as
        their layer is put back (``"mmap"``: into its file), also when the loop body raises."""
        names = list(layers)
        current = None
        try:
            for i, name in enumerate(names):
                layer = layers[name]
                current = name
                self.fetch(name, layer, non_blocking=True)
                if i + 1 < len(names):
                    self.prefetch(names[i + 1], layers[names[i + 1]])
                yield name, layer
                current = None  # a release that fails is not retried by the cleanup below
                self.release(name, layer)
        finally:
            try:  # the prefetched copy first: it must not outlive the stream even if a release below fails
                for name in list(self._prefetched):
                    self._prefetched.pop(name)
                    self._count(-1)
            finally:
                if current is not None:
                    self.release(current, layers[current])

    @contextmanager
    def resident(self, layers: dict):
        """``with placement.resident(layers):`` the bases of all ``layers`` are on their device at once;
        on exit they go back off it (also when the block raises). The controller's boundaries use
        :meth:`stream` instead (one layer at a time)."""
        try:
            self.fetch_all(layers)
            yield layers
        finally:
            self.offload(layers)

    def fetch_all(self, layers: dict) -> None:
        """Every layer's bases back on its device (asynchronous copies from pinned memory on CUDA)."""
        for name, layer in layers.items():
            self.fetch(name, layer, non_blocking=True)

    # --- mmap -----------------------------------------------------------------------------------------
    def _write_mmap(self, name: str, layer) -> None:
        """Write ``layer``'s bases to its own file (atomically: a temp file renamed over it) and put
        views of the mapped file in their place."""
        from .bases import save_file_atomically

        rank = this_rank()  # one folder per rank: no two writers
        folder = os.path.join(self.folder, f"rank{rank}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{_file_stem(name)}.safetensors")
        tensors = {k: getattr(layer, k).detach().cpu().contiguous() for k in _BASES if getattr(layer, k).numel()}
        save_file_atomically(tensors, path)
        mapped = _map_safetensors(path) if tensors else {}
        for k in _BASES:
            t = getattr(layer, k)
            setattr(layer, k, mapped.get(k, torch.empty(t.shape, dtype=t.dtype)))
        self._mapped[name] = {k: getattr(layer, k) for k in _BASES}


def _file_stem(name: str) -> str:
    """A file name for the layer ``name``: its module path with anything but letters, digits, ``.``,
    ``-`` and ``_`` percent-escaped (a ``ModuleDict`` key may hold ``/``), and, when that is long, a
    prefix plus a digest (file names stop at 255 bytes; case-insensitive file systems are not
    guarded against)."""
    from urllib.parse import quote

    stem = quote(name, safe=".-_")
    if len(stem) > 120:
        stem = f"{stem[:80]}-{hashlib.blake2b(name.encode(), digest_size=12).hexdigest()}"
    return stem


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
