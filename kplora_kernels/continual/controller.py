"""The KeepLoRA++ controller: wrap a model, then for each task ``begin_task`` → train → ``end_task``.

``begin_task`` estimates the projected task gradient through the layers' gradient hook (no weight
``.grad``), sets ``A`` to its top-r right singular vectors and zeroes ``B``. ``end_task`` merges the
adapters into the weights, runs the task's data through the merged model collecting each adapted
linear's inputs (once per shared input), and expands ``V`` by the GPM rule.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
from contextlib import contextmanager

import torch
import torch.distributed
from torch import nn

from ..distributed import is_distributed, is_rank0
from ..nn import FusedKeepLoRALinear, register_projection_hooks
from ..nn.linear import assign_, full
from ..schedules import layer_scales
from ..subspace import GradientSketch, InputSketch, principal_subspace
from ..subspace.sketch import complement_basis
from .adapters import find_targets, replace_module, split_multihead_attention
from .config import KeepLoRAConfig

FORMAT = "kplora-controller/1"


def _from_rank0(t: torch.Tensor, group) -> torch.Tensor:
    """Every rank gets rank 0's tensor (shapes may differ before: they are sent first), so that
    bases and adapters are identical everywhere even if decompositions round differently."""
    if not is_distributed():
        return t
    src = torch.distributed.get_global_rank(group, 0) if group else 0
    shape = [list(t.shape)]
    torch.distributed.broadcast_object_list(shape, src=src, group=group)
    out = t.contiguous() if list(t.shape) == shape[0] else t.new_empty(shape[0])
    torch.distributed.broadcast(out, src=src, group=group)
    return out


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


class KeepLoRA:
    """Wraps ``model`` in place: every target linear becomes a :class:`FusedKeepLoRALinear` with its
    layer scale and, except for ``method="lora"``, the principal subspace of its pre-trained weight
    as protected basis ``V`` (and ``U`` with ``eps_w_out``). The model's outputs are unchanged.
    ``layer_index`` maps module paths to layer indices where they cannot be parsed from the path.
    ``compute_bases=False`` skips the principal subspaces (when a checkpoint will provide them).

    Under ``torch.distributed`` (DDP: wrap the model after this, train through the wrapper) each rank
    passes its shard of the data to ``begin_task``/``end_task``; the sketches are summed over
    ``process_group`` and rank 0's ``A`` and bases are broadcast, so every rank holds the same state
    as a single process that saw the global batch. :meth:`save` writes from rank 0 only.
    """

    def __init__(self, model: nn.Module, config: KeepLoRAConfig | None = None, *, progress: bool = True,
                 compute_bases: bool = True, layer_index: dict | None = None, process_group=None):
        self.model, self.config, self.process_group = model, config or KeepLoRAConfig(), process_group
        self.progress = progress and is_rank0()
        cfg = self.config
        split_multihead_attention(model)
        model.requires_grad_(False)
        extra = [re.compile(p) for p in cfg.extra_trainable]
        self._extra_names = [n for n, _ in model.named_parameters() if any(e.search(n) for e in extra)]
        for p in self.extra_parameters.values():
            p.requires_grad_(True)
        self.targets = find_targets(model, cfg.targets, layer_index)
        depth = {}
        for t in self.targets:
            depth[t.tower] = max(depth.get(t.tower, 0), t.index + 1)
        self.layers: dict[str, FusedKeepLoRALinear] = {}
        for t in self.targets:
            scaled = cfg.method == "keeplora++" and t.tower in cfg.layer_scaling_towers
            scale = layer_scales(depth[t.tower], cfg.gamma, cfg.schedule)[t.index] if scaled else 1.0
            layer = FusedKeepLoRALinear.from_linear(model.get_submodule(t.name), cfg.rank, cfg.alpha, scale)
            replace_module(model, t.name, layer)
            self.layers[t.name] = layer
            if compute_bases and cfg.method != "lora":
                W = full(layer.weight.detach())
                V = principal_subspace(W, cfg.eps_for(t.tower), "in")[:, : layer.in_features - layer.rank]
                U = principal_subspace(W, cfg.eps_w_out, "out").to(self._basis_dtype) if cfg.eps_w_out else None
                self._set_input_basis(layer, V, complement=False)
                if U is not None:
                    layer.set_bases(U=_from_rank0(U, process_group))
        self.task_index = 0

    @property
    def extra_parameters(self) -> dict[str, nn.Parameter]:
        """The ``extra_trainable`` parameters, looked up afresh: FSDP2 replaces parameter objects."""
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self._extra_names}

    @property
    def _basis_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.config.basis_dtype == "bf16" else torch.float32

    def _set_input_basis(self, layer: FusedKeepLoRALinear, V: torch.Tensor, complement: bool) -> None:
        """Store ``V`` (with ``complement``: already its complement) in the cheaper form, switching to
        the complement once the protected subspace covers more than half of the input space (it only
        grows, so a complement never switches back). Rank 0's is used."""
        if not complement and V.shape[1] > layer.in_features / 2:
            V, complement = complement_basis(V), True
        layer.set_bases(V=_from_rank0(V.to(self._basis_dtype), self.process_group), V_complement=complement)

    # --- the task lifecycle ------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapters' trainable parameters and the ``extra_trainable`` ones, for the user's optimizer."""
        adapters = [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B) if p.requires_grad]
        return adapters + list(self.extra_parameters.values())

    def register_projection_hook(self, optimizer: torch.optim.Optimizer):
        """Re-project every adapter after each ``optimizer.step()``; returns the removable handle."""
        return register_projection_hooks(self.model, optimizer)

    def _batches(self, loader, fraction: float, desc: str):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        try:
            total = max(1, math.ceil(fraction * len(loader)))
        except TypeError:  # an iterable without len: use all of it
            total = None
        batches = loader if total is None else itertools.islice(loader, total)
        return _progress(batches, total, f"{desc} (task {self.task_index})", self.progress)

    def begin_task(self, loader, loss_fn, fraction: float = 1.0) -> None:
        """Initialise the adapters for a new task: ``A`` from the projected task gradient (over the
        first ``fraction`` of ``loader``; ``loss_fn(model, batch)`` returns the loss), ``B = 0``."""
        cfg = self.config
        if cfg.method == "lora":
            gen = torch.Generator().manual_seed(cfg.seed + self.task_index)
            for layer in self.layers.values():
                A = torch.linalg.qr(torch.randn(layer.in_features, layer.rank, generator=gen))[0].mT
                layer.reset_adapter(A)
            return
        sketches = {}
        for name, layer in self.layers.items():
            sketches[name] = GradientSketch(layer.out_features, layer.in_features, layer.rank,
                                            U=layer.U if layer.U.shape[1] else None, V=layer.V,
                                            V_complement=layer.V_complement,
                                            memory_budget=cfg.sketch_memory_budget,
                                            seed=cfg.seed + self.task_index, device=layer.weight.device)
            layer.grad_accumulator = sketches[name]
        try:
            for batch in self._batches(loader, fraction, "task gradient"):
                loss_fn(self.model, batch).backward()
        finally:
            for layer in self.layers.values():
                layer.grad_accumulator = None
        for p in self.trainable_parameters():
            p.grad = None  # the estimation pass is not a training step
        for name, layer in self.layers.items():
            sketches[name].all_reduce(self.process_group)  # a no-op without torch.distributed
            A = _from_rank0(sketches[name].adapter_init().to(layer.V.device), self.process_group)
            layer.reset_adapter(A)

    def end_task(self, loader, forward_fn, fraction: float = 1.0) -> None:
        """Merge the adapters, then expand each ``V`` by the GPM rule from the inputs the merged model
        sees on the first ``fraction`` of ``loader`` (``forward_fn(model, batch)`` runs a forward)."""
        cfg = self.config
        for layer in self.layers.values():
            layer.absorb_()
        if cfg.method != "lora":
            self._expand_bases(loader, forward_fn, fraction)
        self.task_index += 1

    def _expand_bases(self, loader, forward_fn, fraction):
        cfg = self.config
        sketch_of: dict[str, InputSketch] = {}
        shared: dict[str, InputSketch] = {}
        for t in self.targets:
            layer = self.layers[t.name]
            exact = 4 * layer.in_features ** 2 <= cfg.sketch_memory_budget
            if exact and t.input_group in shared:  # q, k, v: one exact sketch of their common input
                sketch_of[t.name] = shared[t.input_group]
                continue
            sketch = InputSketch(layer.in_features, layer.V, V_complement=layer.V_complement,
                                 memory_budget=cfg.sketch_memory_budget,
                                 seed=cfg.seed + self.task_index, device=layer.weight.device)
            sketch_of[t.name] = sketch
            if exact:
                shared[t.input_group] = sketch
            layer.input_accumulator = sketch
        try:
            with torch.no_grad():
                for batch in self._batches(loader, fraction, "input subspace"):
                    forward_fn(self.model, batch)
        finally:
            for layer in self.layers.values():
                layer.input_accumulator = None
        for sketch in {id(s): s for s in sketch_of.values()}.values():
            sketch.all_reduce(self.process_group)
        for t in self.targets:
            layer = self.layers[t.name]
            V = sketch_of[t.name].expand(layer.V, cfg.eps_f, V_complement=layer.V_complement, keep_free=layer.rank)
            self._set_input_basis(layer, V, layer.V_complement)

    @contextmanager
    def task(self, loader, loss_fn, forward_fn=None, fraction: float = 1.0):
        """``with kl.task(loader, loss_fn): train...`` runs :meth:`begin_task` and :meth:`end_task`
        (with ``forward_fn``, by default ``loss_fn`` without gradients)."""
        self.begin_task(loader, loss_fn, fraction)
        yield self
        self.end_task(loader, forward_fn or loss_fn, fraction)

    # --- checkpoints ------------------------------------------------------------------------------
    def _layout(self) -> dict:
        layout = {name: [layer.out_features, layer.in_features, layer.rank, layer.layer_scale]
                  for name, layer in self.layers.items()}
        layout.update({f"extra.{n}": list(p.shape) for n, p in self.extra_parameters.items()})
        return layout

    def save(self, path: str) -> None:
        """Everything needed to continue the sequence (config, task index, the adapted layers' merged
        weights, bases and adapters) as safetensors, written atomically (temp file + rename). Under
        torch.distributed only rank 0 writes, and every rank waits for it; the file holds full
        tensors, so it loads under any world size."""
        tensors = {}  # gathered on every rank (DTensor shards under FSDP2), written by rank 0
        for name, layer in self.layers.items():
            for key in ("weight", "lora_A", "lora_B", "V", "U"):
                tensors[f"{name}.{key}"] = full(getattr(layer, key).detach()).cpu().contiguous().clone()
        for name, p in self.extra_parameters.items():
            tensors[f"extra.{name}"] = full(p.detach()).cpu().contiguous().clone()
        if is_rank0():
            self._write(path, tensors)
        if is_distributed():
            torch.distributed.barrier(group=self.process_group)

    def _write(self, path: str, tensors: dict) -> None:
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "config": self.config.to_dict(), "task_index": self.task_index,
                "layout": self._layout(), "V_complement": {n: l.V_complement for n, l in self.layers.items()}}
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            save_file(tensors, tmp, metadata={"kplora": json.dumps(meta)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @staticmethod
    def _read(path: str):
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint at {path}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("kplora", "null"))
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for bad files
            raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupt): {exc}") from exc
        if not meta or meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a kplora controller checkpoint (format {FORMAT})")
        return meta, tensors

    def load(self, path: str) -> None:
        """Restore a :meth:`save` d state into this (freshly wrapped) model; refuses a checkpoint of
        another architecture or configuration."""
        meta, tensors = self._read(path)
        if meta["config"] != self.config.to_dict():
            diff = {k: (v, self.config.to_dict().get(k)) for k, v in meta["config"].items()
                    if self.config.to_dict().get(k) != v}
            raise ValueError(f"checkpoint {path} was written with another configuration "
                             f"(key: (checkpoint, this)): {diff}")
        mine, theirs = self._layout(), meta["layout"]
        if mine != theirs:
            missing = sorted(set(theirs) - set(mine))[:3]
            extra = sorted(set(mine) - set(theirs))[:3]
            changed = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])[:3]
            raise ValueError(f"checkpoint {path} is for another architecture: layers only in the checkpoint "
                             f"{missing}, only in this model {extra}, of other shape {changed}")
        with torch.no_grad():
            for name, layer in self.layers.items():
                dev = layer.weight.device
                assign_(layer.weight, tensors[f"{name}.weight"])
                layer.V = tensors[f"{name}.V"].to(dev)
                layer.V_complement = bool(meta.get("V_complement", {}).get(name, False))
                layer.U = tensors[f"{name}.U"].to(dev)
                assign_(layer.lora_A, tensors[f"{name}.lora_A"])
                assign_(layer.lora_B, tensors[f"{name}.lora_B"])
            for name, p in self.extra_parameters.items():
                assign_(p, tensors[f"extra.{name}"])
        self.task_index = meta["task_index"]

    @classmethod
    def from_checkpoint(cls, model: nn.Module, path: str, *, progress: bool = True) -> "KeepLoRA":
        """Wrap a freshly built ``model`` with the checkpoint's configuration and restore its state."""
        meta, _ = cls._read(path)
        kl = cls(model, KeepLoRAConfig.from_dict(meta["config"]), progress=progress, compute_bases=False)
        kl.load(path)
        return kl
