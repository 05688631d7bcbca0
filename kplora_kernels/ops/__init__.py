"""Functional ops. ``reference`` holds the pure-torch oracle of each op."""
from .reference import project_rows, residual_project

__all__ = ["project_rows", "residual_project"]
