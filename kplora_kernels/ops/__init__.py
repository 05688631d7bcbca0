"""Functional ops with backend dispatch; ``reference`` holds the pure-torch oracle of each op."""
from .projection import BACKENDS, project_rows, residual_project, resolve_backend

__all__ = ["BACKENDS", "project_rows", "residual_project", "resolve_backend"]
