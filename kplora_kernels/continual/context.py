"""What a method (:mod:`.methods`) and an adapter mode (:mod:`.adapter_modes`) see of the engine.

:class:`EngineContext` is a narrow, read-only view that :class:`~.controller.KeepLoRA` hands to the
strategies at each call: the model and its adapted layers, the configuration, the task index, the
process group and the basis placement, plus the few services they ask for — the task's batches,
one data pass collecting each layer's inputs, rank 0's tensor on every rank, and storing a grown
input basis. The strategies never hold the engine itself, so they cannot reach into its lifecycle
state, and this module imports nothing of the engine (no import cycle).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..distributed import broadcast_from_rank0
from ..subspace import InputSketch
from ..subspace.sizing import input_strategy
from ..subspace.sketch import complement_basis
from ..training import progress as progress_bar
from .inputs import collect_inputs
from .placement import BasisPlacement

PASS_SEED_STRIDE = 1_000_003  # seed offset of each further input-sketch pass of one task (a prime)


@dataclass(frozen=True)
class EngineContext:
    """The engine's state a strategy may use, for one call.

    ``layers`` is the engine's own ``{name: FusedKeepLoRALinear}`` (in model order; emptied in place
    when the model is unloaded, so hooks holding a context then touch nothing). ``task_index`` is the
    open (or next) task's index, from 0. ``trainable`` returns what the user's optimizer trains now
    (the adapters' trainable factors or full-mode weights, and the ``extra_trainable`` parameters)."""

    model: nn.Module
    layers: dict
    config: object  # the engine's KeepLoRAConfig
    task_index: int
    process_group: object
    placement: BasisPlacement
    progress: bool
    trainable: Callable[[], list]

    @property
    def basis_dtype(self) -> torch.dtype:
        """The storage dtype of the bases (``config.basis_dtype``)."""
        return torch.bfloat16 if self.config.basis_dtype == "bf16" else torch.float32

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` on every rank of the process group (``t`` itself without torch.distributed)."""
        return broadcast_from_rank0(t, self.process_group)

    def batches(self, loader, fraction: float, desc: str):
        """The first ``fraction`` (a number in (0, 1]; ``ValueError`` otherwise) of ``loader``, with a
        progress bar labelled ``desc``; all of it when ``loader`` has no ``len()``."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
        try:
            total = max(1, math.ceil(fraction * len(loader)))
        except TypeError:  # an iterable without len: use all of it
            total = None
        batches = loader if total is None else itertools.islice(loader, total)
        return progress_bar(batches, total=total, desc=f"{desc} (task {self.task_index})", enabled=self.progress)

    def collect_inputs(self, loader, forward_fn, fraction: float, desc: str, *, layers: dict | None = None,
                       sketch_pass: int = 0) -> dict[str, InputSketch]:
        """``{name: InputSketch}`` of each adapted linear's inputs (of ``layers``, a sub-dict of
        :attr:`layers`; all by default) over the first ``fraction`` of ``loader`` (``forward_fn(model,
        batch)``, without gradients); layers that really receive the same tensor share one exact sketch
        (see :mod:`.inputs`). Each sketch is built against its layer's current ``V`` (held by reference
        where it lives) and summed over the process group. ``sketch_pass`` (≥ 0) draws a fresh test
        matrix for a further pass over the same task's data."""
        cfg = self.config
        layers = self.layers if layers is None else layers
        seed = cfg.seed + self.task_index + PASS_SEED_STRIDE * sketch_pass

        # a further pass decides whether eps_f is met: its residual energy is measured, not estimated,
        # where the bases live on the device anyway (elsewhere that would hold them there for the pass)
        measured = sketch_pass and cfg.residual_energy == "auto" and self.placement.mode == "device"
        residual = "exact" if measured else cfg.residual_energy

        def exact(name):
            return input_strategy(layers[name].in_features, cfg.sketch_memory_budget) == "covariance"

        def make(name):
            layer = layers[name]
            return InputSketch(layer.in_features, layer.V, V_complement=layer.V_complement,
                               memory_budget=cfg.sketch_memory_budget, residual=residual,
                               seed=seed, device=layer.weight.device)

        sketches = collect_inputs(layers, self.batches(loader, fraction, desc),
                                  lambda batch: forward_fn(self.model, batch), make, exact=exact)
        for sketch in {id(s): s for s in sketches.values()}.values():
            sketch.all_reduce(self.process_group)
        return sketches

    def set_input_basis(self, layer, V: torch.Tensor, complement: bool) -> None:
        """Store ``V`` (``in×k``; with ``complement``: already the complement basis) in ``layer`` in the
        cheaper form, switching to the complement once the protected subspace covers more than half of
        the input space (it only grows, so a complement never switches back). Rank 0's is stored on
        every rank, in :attr:`basis_dtype`."""
        if not complement and V.shape[1] > layer.in_features / 2:
            V, complement = complement_basis(V), True
        # V is the caller's fresh result (a decomposition's, or rank 0's broadcast): the layer may own it
        layer.set_bases(V=self.broadcast(V.to(self.basis_dtype)), V_complement=complement, copy=False)
