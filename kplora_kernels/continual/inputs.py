"""Collecting what each adapted linear reads over a task's data: one input sketch per distinct tensor.

Linears that receive the very same tensor in the forward (q, k, v of a self-attention; gate and up of
a gated MLP) can share one exact (covariance) sketch, which serves every basis. Which layers share is
decided at run time, never from module names: on the first batch every layer's inputs are kept and
layers whose inputs are the same tensors (same storage, offset, shape, strides and dtype while all are
alive, so the same values) form a group. In a cross-attention block, k and v read the encoder output
and q the decoder states, so q gets its own sketch. Later batches are checked the same way; a group
whose members stop receiving one tensor raises instead of growing a basis from the wrong inputs.

Memory: while a batch runs, the inputs of grouped layers (and on the first batch of every layer with
an exact sketch) are kept alive until the batch ends; for a group this is one tensor (its members
share it), e.g. ``tokens×in`` per attention block.
"""
from __future__ import annotations

import torch

from ..subspace import InputSketch


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` view the same memory the same way (while both are alive: the same values)."""
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr())


class _Recorder:
    """An input accumulator that keeps every input of the current batch."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def update(self, X: torch.Tensor) -> None:
        self.seen.append(X)


def _same_sequence(a: list, b: list) -> bool:
    return len(a) == len(b) and all(same_tensor(x, y) for x, y in zip(a, b))


def collect_inputs(layers: dict, batches, forward, make_sketch, *, exact) -> dict[str, InputSketch]:
    """Run ``forward(batch)`` without gradients over ``batches`` and return ``{name: sketch}`` of the
    inputs each layer of ``layers`` (``{name: FusedKeepLoRALinear}``) received; layers that received
    the same tensors share one sketch object. ``make_sketch(name)`` builds a layer's sketch;
    ``exact(name)`` says whether it will be an exact (basis-independent, shareable) one.

    Raises ``ValueError`` when ``batches`` is empty (naming the loader) and ``RuntimeError`` when
    layers grouped on the first batch receive different tensors later."""
    names = list(layers)
    sketches: dict[str, InputSketch] = {}
    groups: list[list[str]] | None = None  # exact layers, grouped after the first batch
    for name in names:
        if not exact(name):
            sketches[name] = make_sketch(name)
    count = 0
    try:
        for batch in batches:
            recorders = {}
            record = [n for n in names if exact(n)] if groups is None else [n for g in groups if len(g) > 1 for n in g]
            for name in names:
                if name in record:
                    recorders[name] = layers[name].input_accumulator = _Recorder()
                elif name in sketches:
                    layers[name].input_accumulator = sketches[name]
                else:  # a singleton of an exact group: fed directly after the first batch
                    layers[name].input_accumulator = None
            with torch.no_grad():
                forward(batch)
            count += 1
            if groups is None:
                groups = []
                for name in record:
                    for group in groups:
                        if _same_sequence(recorders[group[0]].seen, recorders[name].seen):
                            group.append(name)
                            break
                    else:
                        groups.append([name])
                for group in groups:
                    sketch = make_sketch(group[0])
                    for name in group:
                        sketches[name] = sketch
            for group in groups:
                if len(group) == 1 and group[0] not in recorders:
                    continue
                leader = recorders[group[0]].seen
                for name in group[1:]:
                    if not _same_sequence(leader, recorders[name].seen):
                        raise RuntimeError(
                            f"{group[0]} and {name} received the same input tensor in the first batch but "
                            f"not in batch {count}; their input subspaces cannot be shared")
                for X in leader:
                    sketches[group[0]].update(X)
            recorders.clear()
    finally:
        for layer in layers.values():
            layer.input_accumulator = None
    if count == 0:
        raise ValueError("the loader yielded no batch: the task's inputs are unknown (pass a non-empty loader)")
    return sketches
