"""The continual-learning engine: wrap a model, then for each task ``begin_task`` → train → ``end_task``.

The method (:mod:`.methods`) decides how adapters start and what is protected or recorded; the
adapter mode (:mod:`.adapter_modes`) how weights train. For KeepLoRA(++), ``begin_task`` estimates
the projected task gradient through the layers' gradient hook (no weight ``.grad``), sets ``A`` to
its top-r right singular vectors and zeroes ``B``; ``end_task`` merges the adapters into the weights,
runs the task's data through the merged model collecting each adapted linear's inputs (one sketch
per distinct input tensor, :mod:`.inputs`), and expands ``V`` by the GPM rule.

This module holds the lifecycle (wrapping, the state machine of ``begin_task``/``end_task``); the
other concerns have their own modules: what the strategies see of the engine (:mod:`.context`), the
task-end passes and the re-sketch rule (:mod:`.boundary`), the checkpoints (:mod:`.checkpoint`), the
pre-trained bases (:mod:`.bases`) and what ``end_task`` returns (:mod:`.report`).
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager

import torch
from torch import nn

from ..distributed import is_rank0
from ..nn import FusedKeepLoRALinear
from ..distributed import full

from ..subspace import InputSketch
from .adapter_modes import make_adapter
from .adapters import find_targets, layer_report, layer_scale, merge_and_unload, replace_module, split_multihead_attention
from .bases import protect_pretrained, weight_fingerprint
from .boundary import check_update_finite, expand_bases
from .checkpoint import FORMAT, READABLE_FORMATS, CheckpointMixin
from .config import KeepLoRAConfig
from .context import EngineContext
from .methods import make_method
from .placement import BasisPlacement
from .report import TaskReport

__all__ = ["FORMAT", "READABLE_FORMATS", "KeepLoRA"]

logger = logging.getLogger(__name__)


class KeepLoRA(CheckpointMixin):
    """The continual-learning engine. Wraps ``model`` in place: every target linear becomes a
    :class:`FusedKeepLoRALinear`; the configured method (:mod:`.methods`: ``keeplora++``, ``keeplora``,
    ``lora``, ``lora-fa``, ``inflora``, ``olora``) decides the protected bases, the layer scales, the
    adapters' initialisation, the extra loss and what is recorded, and the ``adapter`` mode
    (:mod:`.adapter_modes`: ``"lora"`` or ``"full"``) how the weights train. The model's outputs are
    unchanged by wrapping. Each target's block index and its tower's depth are read from the model's
    block stacks (:mod:`.targets`); ``layer_index`` (``{module path: block index}``) overrides them for
    the targets it names. ``compute_bases=False`` skips the principal subspaces (when a checkpoint
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
        self._check_scaled_towers()
        self.layers: dict[str, FusedKeepLoRALinear] = {}
        self._pretrained_fingerprints: dict[str, str] = {}  # of each target weight at wrap (compact checkpoints)
        for t in self.targets:
            scaled = self.method.layer_scaling and t.tower in cfg.layer_scaling_towers
            scale = layer_scale(t, cfg.gamma, cfg.schedule) if scaled else 1.0  # t.depth: blocks in its stack
            layer = FusedKeepLoRALinear.from_linear(model.get_submodule(t.name), cfg.rank, cfg.alpha, scale,
                                                    dropout=cfg.dropout)
            replace_module(model, t.name, layer)
            self.layers[t.name] = layer
            self.adapter.wrap(layer, self.method)
            self._pretrained_fingerprints[t.name] = weight_fingerprint(full(layer.weight.detach()))
        # every absorbed update so far, in order: [{name: (B, A)}] (CPU copies); None when unknown (the
        # weights were loaded from a full-form checkpoint or trained in full mode)
        self._history: list[dict] | None = [] if cfg.adapter == "lora" else None
        self.placement = placement if isinstance(placement, BasisPlacement) else BasisPlacement(placement)
        if self.adapter.name == "full" and self.placement.mode != "device":  # every step's projection reads them
            logger.info("adapter='full' keeps the bases on the device (every step projects on them); "
                        "placement %r is not used", self.placement.mode)
            self.placement = BasisPlacement("device")
        self.task_index = 0
        self.task_open = False
        self._merged_open_task = False  # the open task's update is merged, its end_task not yet finished
        if compute_bases and self.method.protects_pretrained:
            protect_pretrained(self._context(), self.targets, self._pretrained_fingerprints, bases_cache_dir)
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
        self.layers.clear()  # in place: hooks holding a context of this engine now touch no layer
        return self.model

    def _check_scaled_towers(self) -> None:
        """A layer-scaling method whose ``layer_scaling_towers`` name none of the targets' towers would
        scale nothing: refused (``ValueError`` naming the towers found); a listed tower without
        targets is logged."""
        if not self.method.layer_scaling:
            return
        found = sorted({t.tower for t in self.targets})
        listed = self.config.layer_scaling_towers
        if not set(listed) & set(found):
            raise ValueError(f"layer_scaling_towers: {listed} name none of the targets' towers {found}: no layer "
                             f"would be scaled; set layer_scaling_towers to some of {found}")
        for tower in sorted(set(listed) - set(found)):
            logger.info("layer_scaling_towers: tower %r holds no target (towers: %s)", tower, found)

    def layer_report(self) -> str:
        """The targets' mapping as a table: module path, tower, block index, tower depth and the layer
        scale ``s_l`` each got (see :func:`~kplora_kernels.continual.targets.layer_report`)."""
        scaling = self.method.layer_scaling
        return layer_report(self.targets, schedule=self.config.schedule if scaling else None,
                            gamma=self.config.gamma, towers=self.config.layer_scaling_towers)

    def print_trainable_parameters(self, layers: bool = False) -> None:
        """Print peft's line ``trainable params: N || all params: M || trainable%: P`` for the wrapped
        model: N counts the parameters the optimizer trains now (:meth:`trainable_parameters`), M
        every parameter of the model once (tied ones once), P = 100·N/M; with ``layers`` the
        :meth:`layer_report` table follows."""
        trainable = sum(p.numel() for p in {id(p): p for p in self.trainable_parameters()}.values())
        total = sum(p.numel() for p in self.model.parameters())
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")
        if layers:
            print(self.layer_report())

    @property
    def extra_parameters(self) -> dict[str, nn.Parameter]:
        """The ``extra_trainable`` parameters, looked up afresh: FSDP2 replaces parameter objects."""
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self._extra_names}

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` on every rank (``t`` itself without torch.distributed)."""
        return self._context().broadcast(t)

    def _context(self) -> EngineContext:
        """The narrow view of this engine that the method and the adapter mode get for one call."""
        return EngineContext(model=self.model, layers=self.layers, config=self.config, task_index=self.task_index,
                             process_group=self.process_group, placement=self.placement, progress=self.progress,
                             trainable=self.trainable_parameters)

    # --- the task lifecycle ------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the user's optimizer trains: the adapters' trainable factors (or, with
        ``adapter="full"``, the target weights while a task is open) and the ``extra_trainable`` ones."""
        return self.adapter.trainable(self._context()) + list(self.extra_parameters.values())

    def register_projection_hook(self, optimizer: torch.optim.Optimizer):
        """Keep every update in its residual subspace for ``optimizer``: re-project every adapter after
        each ``optimizer.step()`` (``adapter="full"``: project the weights' gradients before the step
        and restore the constraint after it). Returns a handle with ``remove()``."""
        return self.adapter.register_hooks(self._context(), optimizer)

    def project_gradients_(self) -> None:
        """``adapter="full"``: project the target gradients now (e.g. before gradient clipping); the
        optimizer's pre-step hook then skips them for this step. A no-op in LoRA mode."""
        if hasattr(self.adapter, "project_gradients_"):
            self.adapter.project_gradients_(self._context())

    def regularization(self) -> torch.Tensor:
        """The method's extra loss for the open task, to add to the task loss (O-LoRA's orthogonality
        and L2 terms; a zero scalar for the other methods)."""
        return self.method.regularization(self._context())

    def batches(self, loader, fraction: float, desc: str):
        """The first ``fraction`` (in (0, 1]) of ``loader``, with a progress bar (see
        :meth:`EngineContext.batches <kplora_kernels.continual.context.EngineContext.batches>`)."""
        return self._context().batches(loader, fraction, desc)

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
        """``{name: InputSketch}`` of each adapted linear's inputs over the first ``fraction`` of
        ``loader`` (``forward_fn(model, batch)``, without gradients), summed over ranks; see
        :meth:`EngineContext.collect_inputs <kplora_kernels.continual.context.EngineContext.collect_inputs>`."""
        return self._context().collect_inputs(loader, forward_fn, fraction, desc, layers=layers,
                                              sketch_pass=sketch_pass)

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
        self.adapter.begin_task(self._context(), self.method, loader, loss_fn, fraction)
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
            check_update_finite(self.layers, self.adapter.name == "full", self.task_index)  # before anything changes: a failure leaves the state as it was
            if self._history is not None:  # what absorb_ folds in, for compact checkpoints
                self._history.append({name: (full(layer.lora_B.detach()).cpu().clone(),
                                             full(layer.lora_A.detach()).cpu().clone())
                                      for name, layer in self.layers.items()})
            self.adapter.end_task(self._context())
            self._record_weights()
            # merged and recorded: a retry after a failing data pass (bad batches) resumes from here
            self._merged_open_task = True
        passes, growth = 0, {}
        if self.method.grows_input_basis:
            passes, growth = expand_bases(self._context(), loader, forward_fn, fraction)
        self.method.end_task(self._context())
        report = TaskReport(task=self.task_index, passes=passes, layers=growth)
        self._merged_open_task = False
        self.task_index += 1
        self.task_open = False
        return report

    @contextmanager
    def task(self, loader, loss_fn, forward_fn=None, fraction: float = 1.0):
        """``with kl.task(loader, loss_fn): train...`` runs :meth:`begin_task` and :meth:`end_task`
        (with ``forward_fn``, by default ``loss_fn`` without gradients)."""
        self.begin_task(loader, loss_fn, fraction)
        yield self
        self.end_task(loader, forward_fn or loss_fn, fraction)

