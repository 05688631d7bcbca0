"""The task-end passes over the data: the finiteness check before a merge and the growth of every
layer's protected input basis by the GPM rule (docs/design.md §1, "Task end"), with the re-sketch
rule for randomized input sketches.

A randomized input sketch (a layer too wide for the exact covariance within
``sketch_memory_budget``) appends at most its width of directions per data pass. A layer whose
sketch ran out of width short of ``eps_f`` (its :class:`~kplora_kernels.subspace.Expansion` says
``saturated``) gets another pass over the same batches with a sketch built against its grown basis,
which sees only the residual, until none is saturated or ``max_sketch_passes`` passes ran; a layer
still short then is logged as a warning naming its width and the energy reached.
"""
from __future__ import annotations

import logging

import torch

from ..distributed import full
from ..subspace.sketch import basis_signature, same_basis
from .context import EngineContext
from .report import BasisGrowth

logger = logging.getLogger(__name__)


def expansion_record(sketch) -> tuple[float, bool, int | None]:
    """``(energy, saturated, width)`` of ``sketch``'s last ``expand`` (its
    :class:`~kplora_kernels.subspace.Expansion`): the fraction of the task's input energy in the grown
    basis, whether a randomized sketch used up its width short of ``eps_f``, and that width (None:
    an exact sketch)."""
    e = sketch.expansion
    return float(e.energy), bool(e.saturated), e.width


def expand_bases(ctx: EngineContext, loader, forward_fn, fraction: float) -> tuple[int, dict]:
    """Grow every layer's ``V`` by the GPM rule from the task's inputs to the merged model, re-sketching
    the residual of saturated layers (module docstring). Returns ``(passes, {name: BasisGrowth})``."""
    cfg = ctx.config
    growth: dict[str, BasisGrowth] = {}
    pending = list(ctx.layers)
    passes = 0
    while pending and passes < cfg.max_sketch_passes:
        passes += 1
        results = expand_pass(ctx, pending, loader, forward_fn, fraction, passes)
        for name, (appended, energy, saturated, width) in results.items():
            before = growth.get(name)
            growth[name] = BasisGrowth(appended=appended + (before.appended if before else 0), energy=energy,
                                       passes=passes, width=width, saturated=saturated)
        pending = [name for name, (_, _, saturated, _) in results.items() if saturated]
    for name in pending:  # the bound stopped them short of eps_f
        g = growth[name]
        logger.warning("end_task: layer %r still has input directions the randomized sketch (width %d) could not "
                       "take in %d data pass(es): %.4f of the task's input energy is protected, below eps_f = %s; "
                       "raise max_sketch_passes (now %d) or sketch_memory_budget (a wider sketch)",
                       name, g.width, passes, g.energy, cfg.eps_f, cfg.max_sketch_passes)
    return passes, growth


def expand_pass(ctx: EngineContext, names: list, loader, forward_fn, fraction: float, number: int) -> dict:
    """Data pass ``number`` (from 1) and the expansion of the layers ``names``, one layer's bases on
    the device at a time; returns ``{name: (appended, energy, saturated, width)}`` as rank 0 decided
    it (every rank then runs the same passes)."""
    cfg = ctx.config
    layers = {name: ctx.layers[name] for name in names}
    desc = "input subspace" if number == 1 else f"input subspace, pass {number}"
    sketches = ctx.collect_inputs(loader, forward_fn, fraction, desc, layers=layers, sketch_pass=number - 1)
    last = None  # (basis given, result, its record) of the previous layer, kept only when this one may share them
    records, appended = {}, {}
    for i, (name, layer) in enumerate(ctx.placement.stream(layers)):
        sketch = sketches.pop(name)
        appended[name] = layer.k_in
        if last is not None and last[0].device == layer.V.device and torch.equal(last[0], layer.V):
            # the same input sketch (q, k, v of one block) and the same basis (e.g. InfLoRA, which
            # protects no pre-trained subspace): the same expansion, decomposed once
            V, record = last[1].clone(), last[2]
        else:
            V = sketch.expand(layer.V, cfg.eps_f, V_complement=layer.V_complement, keep_free=layer.rank)
            record = expansion_record(sketch)
        # keep this layer's old and new basis only when the next one shares the sketch and could share
        # the basis (same shape and form): at most two more bases on the device, and only then
        after = layers[names[i + 1]] if i + 1 < len(names) else None
        shares = (after is not None and sketches.get(names[i + 1]) is sketch and sketch.strategy == "covariance"
                  and after.V.shape == layer.V.shape and after.V_complement == layer.V_complement
                  and after.rank == layer.rank and same_basis(basis_signature(after.V), basis_signature(layer.V)))
        last = (layer.V, V, record) if shares else None  # shares: same sketch, form and rank, probe-equal basis
        ctx.set_input_basis(layer, V, layer.V_complement)
        appended[name] = layer.k_in - appended[name]
        records[name] = record
    # rank 0's decisions (the bases are rank 0's): every rank runs the same passes
    flags = torch.tensor([[float(r[1]), r[0]] for r in records.values()], dtype=torch.float64)
    agreed = ctx.broadcast(flags.to(layers[names[0]].weight.device)).cpu()
    return {name: (appended[name], float(agreed[i, 1]), bool(agreed[i, 0]), width)
            for i, (name, (_, _, width)) in enumerate(records.items())}


@torch.no_grad()
def check_update_finite(layers: dict, full_mode: bool, task_index: int) -> None:
    """Raise ``FloatingPointError`` naming the first layer whose task update is not finite (a NaN or
    Inf in ``A``, ``B``, ``c·B A`` or the merged weight; with ``full_mode``, the trained weight),
    before the merge touches any weight (peft's ``safe_merge`` check)."""
    for name, layer in layers.items():
        W = full(layer.weight.detach())
        if full_mode:
            bad = {"weight": W}
        else:
            delta = layer.delta_weight()
            bad = {"lora_A": full(layer.lora_A.detach()), "lora_B": full(layer.lora_B.detach()),
                   "c·B A": delta, "the merged weight": W.to(delta.dtype) + delta}
        for what, t in bad.items():
            if not bool(torch.isfinite(t).all()):
                raise FloatingPointError(
                    f"end_task: layer {name!r} has a non-finite update ({what} holds NaN or Inf), so nothing "
                    f"was merged, recorded or expanded and task {task_index} is still open; the training "
                    "diverged: lower the learning rate, clip gradients, or resume from a checkpoint, then "
                    "train again and call end_task")
