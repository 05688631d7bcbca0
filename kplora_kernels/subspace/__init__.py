"""Principal subspaces, GPM expansion and randomized SVD (streaming sketches build on these)."""
from .linalg import LinearOperator, energy_rank, gpm_expand, principal_subspace, randomized_svd

__all__ = ["LinearOperator", "energy_rank", "gpm_expand", "principal_subspace", "randomized_svd"]
