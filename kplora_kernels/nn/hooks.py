"""The two small interfaces through which :class:`FusedKeepLoRALinear` feeds the subspace machinery.

Shapes: ``X`` is ``tokens×in`` (the layer's input, leading dims flattened), ``dY`` is
``tokens×out`` (the gradient of the loss with respect to the layer's output). Both arrive detached.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class GradientAccumulator(Protocol):
    """Receives ``(dY, X)`` of every backward pass, so that the task-start gradient
    ``G = (1/N) Σ dYᵀ X`` (``out×in``) can be accumulated, or sketched, without a weight ``.grad``."""

    def update(self, dY: torch.Tensor, X: torch.Tensor) -> None: ...


@runtime_checkable
class InputAccumulator(Protocol):
    """Receives ``X`` of every forward pass, to estimate the task's input subspace."""

    def update(self, X: torch.Tensor) -> None: ...
