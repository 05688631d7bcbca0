"""Principal subspaces, GPM expansion, randomized SVD, and the streaming sketches built on them."""
from .linalg import LinearOperator, energy_rank, gpm_count, gpm_expand, principal_subspace, randomized_svd
from .sketch import Expansion, GradientSketch, InputSketch

__all__ = ["Expansion", "GradientSketch", "InputSketch", "LinearOperator", "energy_rank", "gpm_count", "gpm_expand",
           "principal_subspace", "randomized_svd"]
