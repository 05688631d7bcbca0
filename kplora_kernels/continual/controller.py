"""The continual-learning engine: wrap a model, then for each task ``begin_task`` → train → ``end_task``.

The method (:mod:`.methods`) decides how adapters start and what is protected or recorded; the
adapter mode (:mod:`.adapter_modes`) how weights train. For KeepLoRA(++), ``begin_task`` estimates
the projected task gradient through the layers' gradient hook (no weight ``.grad``), sets ``A`` to
its top-r right singular vectors and zeroes ``B``; ``end_task`` merges the adapters into the weights,
runs the task's data through the merged model collecting each adapted linear's inputs (one sketch
per distinct input tensor, :mod:`.inputs`), and expands ``V`` by the GPM rule.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
from contextlib import contextmanager

import torch
from torch import nn

from ..atomic import write_atomically
from ..distributed import barrier, broadcast_from_rank0, is_rank0
from ..nn import FusedKeepLoRALinear
from ..nn.linear import add_, assign_, full, low_rank_delta
from ..schedules import layer_scales
from ..training import progress
from ..subspace import InputSketch
from ..subspace.sketch import basis_signature, complement_basis, same_basis
from .adapter_modes import make_adapter
from .adapters import find_targets, merge_and_unload, replace_module, split_multihead_attention
from .bases import principal_bases, weight_fingerprint
from .config import KeepLoRAConfig
from .placement import BasisPlacement
from .report import BasisGrowth, TaskReport
from .inputs import collect_inputs
from .methods import make_method

logger = logging.getLogger(__name__)


def _protected_dims(layer) -> int:
    """The dimension of the protected input subspace (``V`` or the complement of its stored form)."""
    return layer.in_features - layer.V.shape[1] if layer.V_complement else layer.V.shape[1]


def _expansion_record(sketch) -> tuple[float, bool, int | None]:
    """``(energy, saturated, width)`` of ``sketch``'s last :meth:`~InputSketch.expand` (its
    :class:`~kplora_kernels.subspace.Expansion`): the fraction of the task's input energy in the grown
    basis, whether a randomized sketch used up its width short of ``eps_f``, and that width (None:
    an exact sketch)."""
    e = sketch.expansion
    return float(e.energy), bool(e.saturated), e.width


FORMAT = "kplora-controller/2"
READABLE_FORMATS = ("kplora-controller/1", FORMAT)
_PASS_SEED_STRIDE = 1_000_003  # seed offset of each further input-sketch pass of one task (a prime)


class KeepLoRA:
    """The continual-learning engine. Wraps ``model`` in place: every target linear becomes a
    :class:`FusedKeepLoRALinear`; the configured method (:mod:`.methods`: ``keeplora++``, ``keeplora``,
    ``lora``, ``lora-fa``, ``inflora``, ``olora``) decides the protected bases, the layer scales, the
    adapters' initialisation, the extra loss and what is recorded, and the ``adapter`` mode
    (:mod:`.adapter_modes`: ``"lora"`` or ``"full"``) how the weights train. The model's outputs are
    unchanged by wrapping. ``layer_index`` maps module paths to layer indices where they cannot be
    parsed from the path. ``compute_bases=False`` skips the principal subspaces (when a checkpoint
    will provide them).

    The lifecycle is a state machine: idle → :meth:`begin_task` → task open (train; add
    :meth:`regularization` to the loss) → :meth:`end_task` → idle. Calling them out of order raises
    ``RuntimeError``; an empty loader raises ``ValueError``.

    Under ``torch.distributed`` (DDP: wrap the model after this, train through the wrapper) each rank
    passes its shard of the data to ``begin_task``/``end_task``; the sketches are summed over
    ``process_group`` and rank 0's ``A`` and bases are broadcast, so every rank holds the same state
    as a single process that saw the global batch. :meth:`save` writes from rank 0 only.

    ``placement`` (a name or a :class:`~kplora_kernels.continual.placement.BasisPlacement`) says where
    the protected bases live between task boundaries: ``"cpu"`` (the default: pinned host memory when
    the model is on CUDA, nothing moves for a model on the CPU), ``"device"`` (with the weights), or
    ``BasisPlacement("mmap", folder)`` (memory-mapped safetensors files, one per layer). Only the
    boundaries (``begin_task``, ``end_task``) bring them back, one layer at a time. ``adapter="full"``
    keeps them on the device whatever ``placement`` says (its every step projects on them; logged);
    so do layers with ``train_A`` or an output basis.
    """

    def __init__(self, model: nn.Module, config: KeepLoRAConfig | None = None, *, progress: bool = True,
                 compute_bases: bool = True, layer_index: dict | None = None, process_group=None,
                 bases_cache_dir: str | None = None, placement: "str | BasisPlacement" = "cpu"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if config is not None and not isinstance(config, KeepLoRAConfig):
            raise TypeError(f"config must be a KeepLoRAConfig, got {type(config).__name__}")
        self.model, self.config, self.process_group = model, config or KeepLoRAConfig(), process_group
        self.progress = progress and is_rank0()
        self._unloaded = False
        cfg = self.config
        self.method = make_method(cfg)
        self.adapter = make_adapter(cfg)
        split_multihead_attention(model, **cfg.target_spec)  # only the attentions that hold a target
        model.requires_grad_(False)
        extra = [re.compile(p) for p in cfg.extra_trainable]
        self._extra_names = [n for n, _ in model.named_parameters() if any(e.search(n) for e in extra)]
        for p in self.extra_parameters.values():
            p.requires_grad_(True)
        self.targets = find_targets(model, layer_index=layer_index, **cfg.target_spec)
        depth = {}
        for t in self.targets:
            depth[t.tower] = max(depth.get(t.tower, 0), t.index + 1)
        self.layers: dict[str, FusedKeepLoRALinear] = {}
        self._pretrained_fingerprints: dict[str, str] = {}  # of each target weight at wrap (compact checkpoints)
        for t in self.targets:
            scaled = self.method.layer_scaling and t.tower in cfg.layer_scaling_towers
            scale = layer_scales(depth[t.tower], cfg.gamma, cfg.schedule)[t.index] if scaled else 1.0
            layer = FusedKeepLoRALinear.from_linear(model.get_submodule(t.name), cfg.rank, cfg.alpha, scale,
                                                    dropout=cfg.dropout)
            replace_module(model, t.name, layer)
            self.layers[t.name] = layer
            self.adapter.wrap(self, layer)
            self._pretrained_fingerprints[t.name] = weight_fingerprint(full(layer.weight.detach()))
        # every absorbed update so far, in order: [{name: (B, A)}] (CPU copies); None when unknown (the
        # weights were loaded from a full-form checkpoint or trained in full mode)
        self._history: list[dict] | None = [] if cfg.adapter == "lora" else None
        self.placement = placement if isinstance(placement, BasisPlacement) else BasisPlacement(placement)
        if self.adapter.name == "full" and self.placement.mode != "device":  # every step's projection reads them
            logger.info("adapter='full' keeps the bases on the device (every step projects on them); "
                        "placement %r is not used", self.placement.mode)
            self.placement = BasisPlacement("device")
        if compute_bases and self.method.protects_pretrained:
            requests = []
            for t in self.targets:
                W = full(self.layers[t.name].weight.detach())
                fingerprint = self._pretrained_fingerprints[t.name]  # taken above: not hashed again
                requests.append(((t.name, "in"), W, cfg.eps_for(t.tower), "in", fingerprint))
                if cfg.eps_w_out:
                    requests.append(((t.name, "out"), W, cfg.eps_w_out, "out", fingerprint))
            # on the host when the placement keeps them there: never every layer's bases on the device
            off = self.placement.mode != "device"
            bases = principal_bases(requests, cache_dir=bases_cache_dir, process_group=process_group,
                                    progress=self.progress, device="cpu" if off else None)
            for name, layer in self.layers.items():
                dev = layer.weight.device
                V = bases.pop((name, "in"))[:, : layer.in_features - layer.rank].to(dev)
                self._set_input_basis(layer, V, complement=False)
                if cfg.eps_w_out:
                    layer.set_bases(U=broadcast_from_rank0(bases.pop((name, "out")).to(dev, self._basis_dtype), process_group))
                self.placement.release(name, layer)  # one layer's bases on the device at a time
        self.task_index = 0
        self.task_open = False
        self._merged_open_task = False  # the open task's update is merged, its end_task not yet finished
        self._record_weights()
        self.placement.offload(self.layers)

    def _check_wrapped(self, where: str) -> None:
        if self._unloaded:
            raise RuntimeError(f"{where}: the model was unloaded by merge_and_unload(); this controller no longer "
                               "wraps it (wrap the returned model with a new KeepLoRA to continue)")

    def merge_and_unload(self) -> nn.Module:
        """peft's ``merge_and_unload``: fold any open adapter into its weight and give back the plain
        model (see :func:`~kplora_kernels.continual.adapters.merge_and_unload`: ``nn.Linear`` modules
        restored, split attentions re-packed), whose state dict loads into a stock model. Save the
        controller first to continue the sequence later: afterwards :meth:`begin_task`,
        :meth:`end_task`, :meth:`save`, :meth:`load` and :meth:`merge_and_unload` raise
        ``RuntimeError``. Returns the model (a new object only when the root itself was wrapped)."""
        self._check_wrapped("merge_and_unload")
        for layer in self.layers.values():
            layer.grad_accumulator = None
            layer.input_accumulator = None
            layer.weight.requires_grad_(False)  # adapter="full" trains them while wrapped; the plain model is frozen
        self.model = merge_and_unload(self.model)
        self._unloaded = True
        self.layers = {}
        return self.model

    def print_trainable_parameters(self) -> None:
        """Print peft's line ``trainable params: N || all params: M || trainable%: P`` for the wrapped
        model: N counts the parameters the optimizer trains now (:meth:`trainable_parameters`), M
        every parameter of the model once (tied ones once), P = 100·N/M."""
        trainable = sum(p.numel() for p in {id(p): p for p in self.trainable_parameters()}.values())
        total = sum(p.numel() for p in self.model.parameters())
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    @property
    def extra_parameters(self) -> dict[str, nn.Parameter]:
        """The ``extra_trainable`` parameters, looked up afresh: FSDP2 replaces parameter objects."""
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self._extra_names}

    @property
    def _basis_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.config.basis_dtype == "bf16" else torch.float32

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` on every rank (``t`` itself without torch.distributed)."""
        return broadcast_from_rank0(t, self.process_group)

    def _set_input_basis(self, layer: FusedKeepLoRALinear, V: torch.Tensor, complement: bool) -> None:
        """Store ``V`` (with ``complement``: already its complement) in the cheaper form, switching to
        the complement once the protected subspace covers more than half of the input space (it only
        grows, so a complement never switches back). Rank 0's is used."""
        if not complement and V.shape[1] > layer.in_features / 2:
            V, complement = complement_basis(V), True
        # V is the caller's fresh result (a decomposition's, or rank 0's broadcast): the layer may own it
        layer.set_bases(V=broadcast_from_rank0(V.to(self._basis_dtype), self.process_group), V_complement=complement, copy=False)

    # --- the task lifecycle ------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the user's optimizer trains: the adapters' trainable factors (or, with
        ``adapter="full"``, the target weights while a task is open) and the ``extra_trainable`` ones."""
        return self.adapter.trainable(self) + list(self.extra_parameters.values())

    def register_projection_hook(self, optimizer: torch.optim.Optimizer):
        """Keep every update in its residual subspace for ``optimizer``: re-project every adapter after
        each ``optimizer.step()`` (``adapter="full"``: project the weights' gradients before the step
        and restore the constraint after it). Returns a handle with ``remove()``."""
        return self.adapter.register_hooks(self, optimizer)

    def project_gradients_(self) -> None:
        """``adapter="full"``: project the target gradients now (e.g. before gradient clipping); the
        optimizer's pre-step hook then skips them for this step. A no-op in LoRA mode."""
        if hasattr(self.adapter, "project_gradients_"):
            self.adapter.project_gradients_(self)

    def regularization(self) -> torch.Tensor:
        """The method's extra loss for the open task, to add to the task loss (O-LoRA's orthogonality
        and L2 terms; a zero scalar for the other methods)."""
        return self.method.regularization(self)

    def batches(self, loader, fraction: float, desc: str):
        """The first ``fraction`` of ``loader`` (with a progress bar)."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
        try:
            total = max(1, math.ceil(fraction * len(loader)))
        except TypeError:  # an iterable without len: use all of it
            total = None
        batches = loader if total is None else itertools.islice(loader, total)
        return progress(batches, total=total, desc=f"{desc} (task {self.task_index})", enabled=self.progress)

    @staticmethod
    def _check_loader(loader, where: str) -> None:
        if loader is None or not hasattr(loader, "__iter__"):
            raise TypeError(f"{where}: loader must be an iterable of batches, got {type(loader).__name__}")
        try:
            empty = len(loader) == 0
        except TypeError:
            return  # no len(): checked while iterating
        if empty:
            raise ValueError(f"{where}: the loader is empty (len(loader) == 0); pass the task's batches")

    def collect_inputs(self, loader, forward_fn, fraction: float, desc: str, *, layers: dict | None = None,
                       sketch_pass: int = 0) -> dict[str, InputSketch]:
        """``{name: InputSketch}`` of each adapted linear's inputs (of ``layers``, a sub-dict of
        :attr:`layers`; all by default) over the first ``fraction`` of ``loader`` (``forward_fn(model,
        batch)``, without gradients); layers that really receive the same tensor share one exact sketch
        (see :mod:`.inputs`). Sketches are built against each layer's current ``V`` and summed over
        ranks. ``sketch_pass`` (≥ 0) draws a fresh test matrix for a further pass over the same task."""
        cfg = self.config
        layers = self.layers if layers is None else layers
        seed = cfg.seed + self.task_index + _PASS_SEED_STRIDE * sketch_pass

        def exact(name):
            return 4 * layers[name].in_features ** 2 <= cfg.sketch_memory_budget

        def make(name):
            layer = layers[name]
            return InputSketch(layer.in_features, layer.V, V_complement=layer.V_complement,
                               memory_budget=cfg.sketch_memory_budget, residual=cfg.residual_energy,
                               seed=seed, device=layer.weight.device)

        sketches = collect_inputs(layers, self.batches(loader, fraction, desc),
                                  lambda batch: forward_fn(self.model, batch), make, exact=exact)
        for sketch in {id(s): s for s in sketches.values()}.values():
            sketch.all_reduce(self.process_group)
        return sketches

    def begin_task(self, loader, loss_fn, fraction: float = 1.0) -> None:
        """Open task ``task_index``: the method initialises the adapters (KeepLoRA: ``A`` from the
        projected task gradient over the first ``fraction`` of ``loader``, ``loss_fn(model, batch)``
        returning the loss; InfLoRA: from the task's inputs; LoRA/O-LoRA: peft's init), ``B = 0``;
        with ``adapter="full"`` the target weights become trainable instead.

        Raises ``RuntimeError`` when a task is already open, ``ValueError`` for an empty loader."""
        self._check_wrapped("begin_task")
        if self.task_open:
            raise RuntimeError(f"begin_task: task {self.task_index} is still open; call end_task first "
                               "(a second begin_task would discard its training)")
        self._check_loader(loader, "begin_task")
        if not callable(loss_fn):
            raise TypeError(f"begin_task: loss_fn must be callable (model, batch) -> loss, got {type(loss_fn).__name__}")
        # the method reads the bases where they live (sketches hold them by reference) and brings them
        # to the device one layer at a time (self.placement.stream) where it needs them there
        self.adapter.begin_task(self, loader, loss_fn, fraction)
        # which layers read their bases in training is known only now (the method's trains_A is set
        # after the estimation pass): those come back, the rest stay off (no copy for them)
        self.placement.offload(self.layers)
        self.task_open = True

    def end_task(self, loader, forward_fn, fraction: float = 1.0) -> TaskReport:
        """Close the open task: merge the adapters into the weights, then, for methods that grow the
        protected input basis, expand each ``V`` by the GPM rule from the inputs the merged model sees
        on the first ``fraction`` of ``loader`` (``forward_fn(model, batch)`` runs a forward); the
        method records what it keeps (O-LoRA: the task's ``A``).

        Each boundary is transactional: every layer's update (and its merged result) is checked for
        NaN/Inf before any weight, history or basis changes (``FloatingPointError`` naming the layer;
        the state is exactly as before, the task still open). A failure of the data pass after the
        merge (an empty or non-finite batch) leaves the task open with its update merged and recorded
        once; calling ``end_task`` again with good data finishes it without merging twice.

        A randomized input sketch (a layer too wide for the exact covariance within
        ``sketch_memory_budget``) appends at most its width per data pass: layers whose sketch ran out
        of width short of ``eps_f`` get further passes over the same batches (each sketching the residual
        of the grown basis), at most ``max_sketch_passes`` in all; a layer still short then is logged as
        a warning naming its width and the energy reached.

        Returns a :class:`~kplora_kernels.continual.report.TaskReport`: the task's index, the number
        of data passes that grew the bases, and per layer the directions appended and the fraction of
        the task's input energy the grown basis holds.

        Raises ``RuntimeError`` when no task is open, ``ValueError`` for an empty loader (the task
        then stays open and ``end_task`` may be called again), ``FloatingPointError`` as above."""
        self._check_wrapped("end_task")
        if not self.task_open:
            raise RuntimeError(f"end_task: no task is open (call begin_task first); {self.task_index} tasks done")
        self._check_loader(loader, "end_task")
        if not callable(forward_fn):
            raise TypeError(f"end_task: forward_fn must be callable (model, batch), got {type(forward_fn).__name__}")
        if not self._merged_open_task:
            self._check_update_finite()  # before anything changes: a failure leaves the state as it was
            if self._history is not None:  # what absorb_ folds in, for compact checkpoints
                self._history.append({name: (full(layer.lora_B.detach()).cpu().clone(),
                                             full(layer.lora_A.detach()).cpu().clone())
                                      for name, layer in self.layers.items()})
            self.adapter.end_task(self)
            self._record_weights()
            # merged and recorded: a retry after a failing data pass (bad batches) resumes from here
            self._merged_open_task = True
        passes, growth = self._expand_bases(loader, forward_fn, fraction) if self.method.grows_input_basis else (0, {})
        self.method.end_task(self)
        report = TaskReport(task=self.task_index, passes=passes, layers=growth)
        self._merged_open_task = False
        self.task_index += 1
        self.task_open = False
        return report

    @staticmethod
    @torch.no_grad()
    def _weight_probe(layer) -> torch.Tensor:
        """``W p`` (fp32, on the host) for a fixed seeded vector ``p``: any change of ``W`` changes it."""
        W = full(layer.weight.detach())
        p = torch.randn(W.shape[1], 1, generator=torch.Generator().manual_seed(0x6b706c))
        return (W.float() @ p.to(W.device)).cpu()

    def _record_weights(self) -> None:
        """Remember each target weight as the library left it (after wrapping, a merge or a load)."""
        self._weight_probes = {name: self._weight_probe(layer) for name, layer in self.layers.items()}

    def _weights_changed_outside(self) -> list[str]:
        """The target weights changed since the library last changed them (a user's edit, also through
        ``.data``, an optimizer that stepped them, a ``load_state_dict``): their probe product differs.
        One matrix-vector product per layer (version counters miss edits through ``.data``)."""
        return [name for name, layer in self.layers.items()
                if not torch.equal(self._weight_probe(layer), self._weight_probes[name])]

    @torch.no_grad()
    def _check_update_finite(self) -> None:
        """Raise ``FloatingPointError`` naming the first layer whose task update is not finite (a NaN
        or Inf in ``A``, ``B``, ``c·B A`` or the merged weight; with ``adapter="full"``, the trained
        weight), before the merge touches any weight (peft's ``safe_merge`` check)."""
        for name, layer in self.layers.items():
            W = full(layer.weight.detach())
            if self.adapter.name == "full":
                bad = {"weight": W}
            else:
                delta = layer.delta_weight()
                bad = {"lora_A": full(layer.lora_A.detach()), "lora_B": full(layer.lora_B.detach()),
                       "c·B A": delta, "the merged weight": W.to(delta.dtype) + delta}
            for what, t in bad.items():
                if not bool(torch.isfinite(t).all()):
                    raise FloatingPointError(
                        f"end_task: layer {name!r} has a non-finite update ({what} holds NaN or Inf), so nothing "
                        f"was merged, recorded or expanded and task {self.task_index} is still open; the training "
                        "diverged: lower the learning rate, clip gradients, or resume from a checkpoint, then "
                        "train again and call end_task")

    def _expand_bases(self, loader, forward_fn, fraction) -> tuple[int, dict]:
        """Grow every layer's ``V`` by the GPM rule from the task's inputs to the merged model. A
        randomized sketch appends at most its width per data pass; a layer whose sketch saturated
        (``energy < eps_f`` with the width used up) gets another pass against its grown basis (the new
        sketch sees the residual), until none is saturated or ``config.max_sketch_passes`` passes ran;
        a layer still short after that is logged as a warning naming its width and the energy reached.
        Returns ``(passes, {name: BasisGrowth})``."""
        cfg = self.config
        growth: dict[str, BasisGrowth] = {}
        pending = list(self.layers)
        passes = 0
        while pending and passes < cfg.max_sketch_passes:
            passes += 1
            results = self._expand_pass(pending, loader, forward_fn, fraction, passes)
            for name, (appended, energy, saturated, width) in results.items():
                before = growth.get(name)
                growth[name] = BasisGrowth(appended=appended + (before.appended if before else 0), energy=energy,
                                           passes=passes, width=width, saturated=saturated)
            pending = [name for name, (_, _, saturated, _) in results.items() if saturated]
        for name in pending:  # the bound stopped them short of eps_f
            g = growth[name]
            logger.warning("end_task: layer %r still has input directions the randomized sketch (width %d) could "
                           "not take in %d data pass(es): %.4f of the task's input energy is protected, below "
                           "eps_f = %s; raise max_sketch_passes (now %d) or sketch_memory_budget (a wider sketch)",
                           name, g.width, passes, g.energy, cfg.eps_f, cfg.max_sketch_passes)
        return passes, growth

    def _expand_pass(self, names: list, loader, forward_fn, fraction, number: int) -> dict:
        """Data pass ``number`` (from 1) and the expansion of the layers ``names``; returns ``{name:
        (appended, energy, saturated, width)}`` as rank 0 decided it (every rank runs the same passes)."""
        cfg = self.config
        layers = {name: self.layers[name] for name in names}
        desc = "input subspace" if number == 1 else f"input subspace, pass {number}"
        sketches = self.collect_inputs(loader, forward_fn, fraction, desc, layers=layers, sketch_pass=number - 1)
        last = None  # (basis given, result, its record) of the previous layer, kept only when this one may share them
        records, protected = {}, {}
        for i, (name, layer) in enumerate(self.placement.stream(layers)):  # one layer's bases at a time
            sketch = sketches.pop(name)
            protected[name] = _protected_dims(layer)
            if last is not None and last[0].device == layer.V.device and torch.equal(last[0], layer.V):
                # the same input sketch (q, k, v of one block) and the same basis (e.g. InfLoRA, which
                # protects no pre-trained subspace): the same expansion, decomposed once
                V, record = last[1].clone(), last[2]
            else:
                V = sketch.expand(layer.V, cfg.eps_f, V_complement=layer.V_complement, keep_free=layer.rank)
                record = _expansion_record(sketch)
            # keep this layer's old and new basis only when the next one shares the sketch and could share
            # the basis (same shape and form): at most two more bases on the device, and only then
            after = layers[names[i + 1]] if i + 1 < len(names) else None
            shares = (after is not None and sketches.get(names[i + 1]) is sketch and sketch.strategy == "covariance"
                      and after.V.shape == layer.V.shape and after.V_complement == layer.V_complement
                      and after.rank == layer.rank and same_basis(basis_signature(after.V), basis_signature(layer.V)))
            last = (layer.V, V, record) if shares else None  # shares: same sketch, form and rank, probe-equal basis
            self._set_input_basis(layer, V, layer.V_complement)
            protected[name] = _protected_dims(layer) - protected[name]
            records[name] = record
        # rank 0's decisions (the bases are rank 0's): every rank runs the same passes
        flags = torch.tensor([[float(r[1]), r[0]] for r in records.values()], dtype=torch.float64)
        agreed = self.broadcast(flags.to(layers[names[0]].weight.device)).cpu()
        return {name: (protected[name], float(agreed[i, 1]), bool(agreed[i, 0]), width)
                for i, (name, (_, _, width)) in enumerate(records.items())}

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

    def save(self, path: str, compact: bool | None = None) -> None:
        """Everything needed to continue the sequence (config, task index, whether a task is open, the
        bases and adapters, the method's and the adapter mode's records, the ``extra_trainable``
        parameters, and the adapted weights in one of two forms) as safetensors.

        ``compact=True`` stores only what cannot be recomputed from the pre-trained model: instead of
        the adapted weights, the history of merged updates (each task's ``B`` and ``A``, whose
        ``c·B A`` was folded into the weight) and a fingerprint of each pre-trained target weight.
        :meth:`load` onto the same pre-trained model re-applies the history with the arithmetic of
        the original merges, so a resume on the same device and library versions is bit-identical;
        a model whose pre-trained weights differ is refused. Per adapted ``out×in`` layer it drops the
        weight (``out·in`` numbers) and adds ``r·(out+in)`` per finished task; the bases stay. ViT-B/16,
        r = 16, fp32: the 156 MiB of the 96 target weights are replaced by 7.5 MiB of history per task,
        so after one task about 66 MiB instead of 214 MiB (the bases, about 50 MiB, dominate); the
        history grows by 7.5 MiB per task. ``compact=False`` stores the adapted weights
        themselves (the full form), for when the pre-trained weights will not be at hand.
        ``compact=None`` (default): compact when possible, else the full form — the compact form is
        impossible with ``adapter="full"`` (the update is not low-rank) and after loading a full-form
        checkpoint (the history is unknown); the form chosen is logged and recorded in the file.
        ``compact=True`` in those cases raises ``ValueError``.

        Written atomically: a temp file ``.<name>.kplora.tmp-<pid>-<token>`` beside ``path``, fsynced,
        renamed over ``path``, then the directory fsynced; temp files that an earlier crashed save left
        (their process is gone) are removed first. Under torch.distributed only rank 0 writes, and
        every rank waits for it; the file holds full tensors, so it loads under any world size.
        Raises ``FileNotFoundError`` when the directory of ``path`` does not exist."""
        self._check_wrapped("save")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        if compact is not None and not isinstance(compact, bool):
            raise TypeError(f"compact must be True, False or None, got {type(compact).__name__} {compact!r}")
        if compact and self._history is None:
            why = ("adapter='full' trains the whole weight, so its update is not low-rank"
                   if self.config.adapter == "full" else
                   "the weights were loaded from a full-form checkpoint, so the history of updates is unknown")
            raise ValueError(f"save(compact=True) is impossible: {why}; use compact=False (the full form)")
        if compact is not False and self._history is not None:
            edited = self._weights_changed_outside()
            if edited and compact:
                raise ValueError(f"save(compact=True) would lose work: {len(edited)} target weight(s) changed outside "
                                 f"the library's merges (first: {edited[:3]}), and a compact checkpoint only replays "
                                 "the recorded merges onto the pre-trained weights; use compact=False (the full form)")
            if edited:
                logger.warning("save: %d target weight(s) changed outside the library's merges (first: %s): writing "
                               "the full form, which keeps them", len(edited), edited[:3])
                compact = False
        if compact is None:
            compact = self._history is not None
            logger.info("save: writing the %s form to %s", "compact" if compact else "full", path)
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"save: the directory of path {path!r} does not exist ({directory}); create it first")
        tensors = {}  # gathered on every rank (DTensor shards under FSDP2), written by rank 0
        keys = ("lora_A", "lora_B", "V", "U") if compact else ("weight", "lora_A", "lora_B", "V", "U")
        for name, layer in self.layers.items():
            for key in keys:
                tensors[f"{name}.{key}"] = full(getattr(layer, key).detach()).cpu().contiguous().clone()
        if compact:
            for i, entry in enumerate(self._history):
                for name, (B, A) in entry.items():
                    tensors[f"history.{i}.{name}.B"] = B.contiguous()
                    tensors[f"history.{i}.{name}.A"] = A.contiguous()
        for name, p in self.extra_parameters.items():
            tensors[f"extra.{name}"] = full(p.detach()).cpu().contiguous().clone()
        for key, t in {**self.method.state_tensors(), **self.adapter.state_tensors(self)}.items():
            tensors[f"state.{key}"] = t.detach().cpu().contiguous().clone()
        extra_meta = ({"form": "compact", "history": len(self._history),
                       "fingerprints": dict(self._pretrained_fingerprints)} if compact else {"form": "full"})
        if is_rank0():
            self._write(path, tensors, extra_meta)
        barrier(self.process_group)

    def _write(self, path: str, tensors: dict, extra_meta: dict) -> None:
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "config": self.config.to_dict(), "task_index": self.task_index,
                "task_open": self.task_open, "merged_open_task": self._merged_open_task, "layout": self._layout(),
                "V_complement": {n: l.V_complement for n, l in self.layers.items()}, **extra_meta}
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"kplora": json.dumps(meta)}),
                         what="controller checkpoint")

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
        if not meta or meta.get("format") not in READABLE_FORMATS:
            raise ValueError(f"{path} is not a kplora controller checkpoint (format {FORMAT})")
        return meta, tensors

    def load(self, path: str) -> None:
        """Restore a state written by :meth:`save` into this (freshly wrapped) model, an open task included;
        refuses a checkpoint of another architecture or configuration (``ValueError``). A compact
        checkpoint needs the model's target weights to be the pre-trained ones it was made from
        (checked by fingerprint, ``ValueError`` otherwise); its history of updates is then re-applied
        in order with the arithmetic of :meth:`FusedKeepLoRALinear.merge_`."""
        self._check_wrapped("load")
        meta, tensors = self._read(path)
        theirs_cfg = KeepLoRAConfig.from_dict(meta["config"]).to_dict()
        mine_cfg = self.config.to_dict()
        if theirs_cfg != mine_cfg:
            diff = {k: (v, mine_cfg.get(k)) for k, v in theirs_cfg.items() if mine_cfg.get(k) != v}
            raise ValueError(f"checkpoint {path} was written with another configuration "
                             f"(key: (checkpoint, this)): {diff}")
        mine, theirs = self._layout(), meta["layout"]
        if mine != theirs:
            missing = sorted(set(theirs) - set(mine))[:3]
            extra = sorted(set(mine) - set(theirs))[:3]
            changed = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])[:3]
            raise ValueError(f"checkpoint {path} is for another architecture: layers only in the checkpoint "
                             f"{missing}, only in this model {extra}, of other shape {changed}")
        compact = meta.get("form", "full") == "compact"
        required = [f"{name}.{key}" for name in self.layers for key in ("lora_A", "lora_B", "V", "U")]
        required += [f"{name}.weight" for name in self.layers] if not compact else [
            f"history.{i}.{name}.{f}" for i in range(int(meta.get("history", 0))) for name in self.layers for f in "BA"]
        required += [f"extra.{name}" for name in self.extra_parameters]
        absent = [key for key in required if key not in tensors]
        if absent or (compact and "fingerprints" not in meta):
            raise ValueError(f"checkpoint {path} is incomplete: it lacks {len(absent)} tensor(s) this model needs "
                             f"(first: {absent[:3]}){' and the fingerprints' if compact and 'fingerprints' not in meta else ''}; "
                             "nothing was loaded")
        if compact:
            stored = meta["fingerprints"]
            differ = [n for n, layer in self.layers.items()
                      if weight_fingerprint(full(layer.weight.detach())) != stored[n]]
            if differ:
                raise ValueError(f"checkpoint {path} is compact: it holds the updates to the pre-trained weights, "
                                 f"not the weights, and {len(differ)} of {len(self.layers)} target weights of this "
                                 f"model differ from the pre-trained ones it was made from (first: {differ[:3]}); "
                                 "load it onto the same freshly built pre-trained model, or save with compact=False")
            history = [{name: (tensors[f"history.{i}.{name}.B"], tensors[f"history.{i}.{name}.A"])
                        for name in self.layers} for i in range(int(meta["history"]))]
            self._replay(history)
            self._history = history
            self._pretrained_fingerprints = dict(stored)
        else:
            self._history = None  # the weights arrive merged: their history is unknown
        with torch.no_grad():
            for name, layer in self.layers.items():
                dev = layer.weight.device
                if not compact:
                    assign_(layer.weight, tensors[f"{name}.weight"])
                layer.V_complement = bool(meta.get("V_complement", {}).get(name, False))
                layer.U = tensors[f"{name}.U"].to(dev).clone()
                layer.V = tensors[f"{name}.V"].to(dev).clone()
                self.placement.release(name, layer)  # one layer's bases on the device at a time
                assign_(layer.lora_A, tensors[f"{name}.lora_A"])
                assign_(layer.lora_B, tensors[f"{name}.lora_B"])
            for name, p in self.extra_parameters.items():
                assign_(p, tensors[f"extra.{name}"])
        state = {k[len("state."):]: t for k, t in tensors.items() if k.startswith("state.")}
        self.task_index = meta["task_index"]
        self.task_open = bool(meta.get("task_open", False))
        self._merged_open_task = bool(meta.get("merged_open_task", False))
        self.method.load_state_tensors(state, self)
        self.adapter.load_state_tensors(self, state, self.task_open)
        self._record_weights()
        self.placement.offload(self.layers)  # the loaded bases go where the placement keeps them (mmap: written)

    @torch.no_grad()
    def _replay(self, history: list) -> None:
        """Fold each recorded update into its weight, in order, exactly as
        :meth:`FusedKeepLoRALinear.merge_` did (``W ← W + c·(B A)`` in fp32, fp64 for fp64 weights);
        the factors are copied into fresh memory on the weight's device first (BLAS rounding can
        depend on alignment)."""
        for entry in history:
            for name, (B, A) in entry.items():
                layer = self.layers[name]
                dev = layer.weight.device
                delta = low_rank_delta(B.to(dev).clone(), A.to(dev).clone(), layer.scaling, layer.weight.dtype)
                add_(layer.weight, delta)

    @classmethod
    def from_checkpoint(cls, model: nn.Module, path: str, *, progress: bool = True,
                        placement: "str | BasisPlacement" = "cpu") -> "KeepLoRA":
        """Wrap a freshly built ``model`` with the checkpoint's configuration and restore its state.
        The placement is not part of the checkpoint: the bases go where ``placement`` keeps them, one
        layer at a time.

        Raises ``FileNotFoundError`` (no file at ``path``), ``ValueError`` (not a controller checkpoint,
        unreadable, another architecture, a model already wrapped, or — compact form — other
        pre-trained weights)."""
        meta, _ = cls._read(path)
        kl = cls(model, KeepLoRAConfig.from_dict(meta["config"]), progress=progress, compute_bases=False,
                 placement=placement)
        kl.load(path)
        return kl
