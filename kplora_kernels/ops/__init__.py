"""Functional ops with backend dispatch; ``reference`` holds the pure-torch oracle of each op.

Projection (docs/design.md §1): :func:`residual_project`, :func:`project_rows`. Full fine-tuning in
the residual subspace: :func:`residual_project_grouped_` (the per-step in-place gradient projection
over all target weights), :func:`subspace_anchor`, :func:`subspace_restore_` and
:func:`subspace_restore_grouped_` (the post-step constraint restore). Dispatch:
:func:`resolve_backend`, :func:`not_supported_reasons`.
"""
from .dispatch import BACKENDS, not_supported_reasons, resolve_backend
from .grouped import (SubspaceAnchor, residual_project_grouped_, subspace_anchor, subspace_restore_,
                      subspace_restore_grouped_)
from .projection import project_rows, residual_project

__all__ = ["BACKENDS", "SubspaceAnchor", "not_supported_reasons", "project_rows", "residual_project",
           "residual_project_grouped_", "resolve_backend", "subspace_anchor", "subspace_restore_",
           "subspace_restore_grouped_"]
