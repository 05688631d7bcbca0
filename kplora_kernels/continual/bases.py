"""Principal subspaces of the pre-trained weights at wrap time: with progress, cached, shared out.

Wrapping a model computes the principal subspace of every target weight (docs/design.md §1,
"Protected bases"): an SVD or Gram ``eigh`` per weight, minutes for a ViT-B/16 and hours of CPU for
a 7B LLM. :func:`principal_bases` makes that cost visible and pays it once:

- a tqdm bar (rank 0 only) over the weights;
- a cache (``cache_dir``): one safetensors file per weight keyed by :func:`weight_fingerprint` of the
  weight, the energy and the side, so a second run, or a second method on the same model, reads the
  bases back instead of decomposing (a file that cannot be read is recomputed and rewritten);
- under ``torch.distributed``, rank ``i mod world`` decomposes weight ``i`` and broadcasts the result,
  so the wall time divides by the world size and every rank holds the same bases.
"""
from __future__ import annotations

import hashlib
import logging
import os

import torch

from ..distributed import broadcast_from, global_rank, world_size
from ..distributed import rank as this_rank
from ..distributed import full
from ..subspace import principal_subspace
from ..training import progress as progress_bar

logger = logging.getLogger(__name__)

CACHE_VERSION = "kplora-bases/1"  # part of every key: a change of the decomposition invalidates old files


def weight_fingerprint(W: torch.Tensor) -> str:
    """A BLAKE2b digest (32 hex digits) of ``W``'s shape, dtype and bytes: equal for equal weights,
    different (with overwhelming probability) for any changed element. Reads the whole tensor once
    (about 1 GB/s on one core); a CUDA tensor is copied to the CPU for it.

    Raises:
        TypeError: ``W`` is not a tensor.
    """
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W: expected a torch.Tensor, got {type(W).__name__}")
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(W.shape)}|{W.dtype}".encode())
    flat = W.detach().to("cpu").contiguous().reshape(-1)
    h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def _cache_file(cache_dir: str, fingerprint: str, eps: float, side: str) -> str:
    key = hashlib.blake2b(f"{CACHE_VERSION}|{fingerprint}|{side}|{float(eps)!r}".encode(), digest_size=16)
    return os.path.join(cache_dir, f"{key.hexdigest()}.safetensors")


def _load(path: str, rows: int) -> torch.Tensor | None:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        return None
    try:
        basis = load_file(path)["basis"]
    except Exception as exc:  # safetensors raises its own error types for damaged files
        logger.warning("bases cache: %s is unreadable (%s); recomputing it", path, exc)
        return None
    if basis.dim() != 2 or basis.shape[0] != rows:
        logger.warning("bases cache: %s holds a %s basis, expected %d rows; recomputing it",
                       path, tuple(basis.shape), rows)
        return None
    return basis


def save_file_atomically(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors' ``save_file`` through :func:`~kplora_kernels.atomic.write_atomically`: a reader
    sees the old file or the new one, never a partial one."""
    from safetensors.torch import save_file

    from ..atomic import write_atomically

    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), what="safetensors file")


def _store(path: str, basis: torch.Tensor) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file_atomically({"basis": basis.detach().cpu().contiguous()}, path, metadata={"format": CACHE_VERSION})


def principal_bases(requests, *, cache_dir: str | None = None, process_group=None, progress: bool = True,
                    desc: str = "principal subspaces", device=None) -> dict:
    """The principal subspace of each requested weight (:func:`~kplora_kernels.principal_subspace`).

    Args:
        requests: an iterable of ``(key, W, eps, side)`` or ``(key, W, eps, side, fingerprint)``: any
            hashable ``key``, ``W`` the whole ``out×in`` weight (not a shard), ``eps`` the energy in
            (0, 1], ``side`` ``"in"`` (right singular vectors, ``in×p``) or ``"out"`` (left,
            ``out×p``), and optionally ``W``'s :func:`weight_fingerprint` when the caller already has
            it (the cache key; hashing a 7B model's weights again costs seconds per GB).
        cache_dir: folder of the safetensors cache (created when missing); None: no cache.
        process_group: under ``torch.distributed``, the ranks that share the work (default: world).
        progress: show a tqdm bar on rank 0.
        device: where the bases are returned (e.g. ``"cpu"``, so that an accelerator never holds all of
            them at once); None: on each weight's device.

    Returns:
        ``{key: basis}`` in fp32 (fp64 for fp64 weights), identical on all ranks.

    Raises:
        TypeError / ValueError: from :func:`~kplora_kernels.principal_subspace` for a bad weight,
            energy or side; ``ValueError`` when ``cache_dir`` exists and is not a folder.
    """
    requests = list(requests)
    if cache_dir is not None:
        cache_dir = os.fspath(cache_dir)
        if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
            raise ValueError(f"cache_dir: expected a folder, got the file {cache_dir!r}")
    world, rank = world_size(process_group), this_rank(process_group)
    mine = [i for i in range(len(requests)) if i % world == rank]
    local, hits = {}, 0
    for i in progress_bar(mine, total=len(mine), desc=desc + (f" (rank 0 of {world})" if world > 1 else ""),
                          enabled=bool(progress)):
        key, W, eps, side, *known = requests[i]
        path = _cache_file(cache_dir, known[0] if known else weight_fingerprint(W), eps, side) if cache_dir else None
        rows = W.shape[1] if side == "in" else W.shape[0]
        basis = _load(path, rows) if path else None
        if basis is None:
            basis = principal_subspace(W, eps, side)
            if path:
                _store(path, basis)
        else:
            hits += 1
        local[i] = basis.to(W.device if device is None else device)
    if cache_dir:
        logger.info("principal subspaces: %d of %d read from the cache in %s", hits, len(mine), cache_dir)
    out = {}
    for i, (key, W, *_) in enumerate(requests):
        if world == 1:
            out[key] = local[i]
        else:
            src = global_rank(process_group, i % world)
            dtype = torch.float64 if W.dtype == torch.float64 else torch.float32  # principal_subspace's
            sent = None if i not in local else local[i].to(W.device)  # the collective runs on the weight's device
            out[key] = broadcast_from(sent, src, process_group, device=W.device, dtype=dtype)
            out[key] = out[key].to(W.device if device is None else device)
            local.pop(i, None)
    return out


def protect_pretrained(ctx, targets, fingerprints: dict, cache_dir: str | None = None) -> None:
    """Set every layer's protected bases from its pre-trained weight: ``V`` (``in×k_in``, at most
    ``in − rank`` columns, stored in the cheaper form) at ``config.eps_for(tower)`` and, with
    ``config.eps_w_out``, ``U`` (``out×k_out``). ``ctx`` is the engine's
    :class:`~kplora_kernels.continual.context.EngineContext`, ``targets`` its found targets (``name``,
    ``tower``), ``fingerprints`` ``{name: weight_fingerprint}`` of the weights as wrapped. The bases are
    computed on the host when the placement keeps them there (never every layer's bases on the
    device) and each layer is released to its placement right after it is set."""
    cfg = ctx.config
    requests = []
    for t in targets:
        W = full(ctx.layers[t.name].weight.detach())
        requests.append(((t.name, "in"), W, cfg.eps_for(t.tower), "in", fingerprints[t.name]))
        if cfg.eps_w_out:
            requests.append(((t.name, "out"), W, cfg.eps_w_out, "out", fingerprints[t.name]))
    off = ctx.placement.mode != "device"
    bases = principal_bases(requests, cache_dir=cache_dir, process_group=ctx.process_group,
                            progress=ctx.progress, device="cpu" if off else None)
    for name, layer in ctx.layers.items():
        dev = layer.weight.device
        V = bases.pop((name, "in"))[:, : layer.in_features - layer.rank].to(dev)
        ctx.set_input_basis(layer, V, complement=False)
        if cfg.eps_w_out:
            layer.set_bases(U=ctx.broadcast(bases.pop((name, "out")).to(dev, ctx.basis_dtype)))
        ctx.placement.release(name, layer)  # one layer's bases on the device at a time
