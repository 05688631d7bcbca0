"""Functional ops: one public function per op that validates once and calls its ``torch.library``
registration (``kplora::*``), whose implementation runs the backend the dispatcher picks.

Projection (docs/design.md §1): :func:`residual_project`, :func:`project_rows`. Full fine-tuning in
the residual subspace: :func:`residual_project_grouped_` (the per-step in-place gradient projection
over all target weights), :func:`subspace_anchor`, :func:`subspace_restore_` and
:func:`subspace_restore_grouped_` (the post-step constraint restore). Streaming subspaces:
:func:`sketch_update`. Dispatch: :func:`resolve_backend`, :func:`not_supported_reasons`,
:func:`resolve_sketch_backend`, :func:`sketch_not_supported_reasons`. Backends: :mod:`.torch_backend`,
the C++ kernels (:mod:`.cpp`), the Triton launchers (:mod:`.triton_kernels`, :mod:`.sketch_triton`).
The float64 oracles of the ops live with the tests (``tests/oracles.py``).
"""
from .dispatch import (BACKENDS, not_supported_reasons, resolve_backend, resolve_sketch_backend,
                       sketch_not_supported_reasons)
from .grouped import (SubspaceAnchor, residual_project_grouped_, subspace_anchor, subspace_restore_,
                      subspace_restore_grouped_)
from .projection import project_rows, residual_project
from .sketch import sketch_update

__all__ = ["BACKENDS", "SubspaceAnchor", "not_supported_reasons", "project_rows", "residual_project",
           "residual_project_grouped_", "resolve_backend", "resolve_sketch_backend", "sketch_not_supported_reasons",
           "sketch_update", "subspace_anchor", "subspace_restore_", "subspace_restore_grouped_"]
