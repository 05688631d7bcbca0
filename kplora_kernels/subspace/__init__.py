"""Principal subspaces, GPM expansion, randomized SVD, and the streaming sketches built on them."""
from .linalg import LinearOperator, energy_rank, gpm_expand, principal_subspace, randomized_svd
from .sketch import GradientSketch, InputSketch

__all__ = ["GradientSketch", "InputSketch", "LinearOperator", "energy_rank", "gpm_expand",
           "principal_subspace", "randomized_svd"]
