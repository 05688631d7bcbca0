"""How large the streaming sketches are: the one place that sizes them from a memory budget.

``InputSketch(strategy="auto")`` keeps the exact covariance where ``4·dim²`` bytes fit the budget,
else a randomized sketch of :func:`input_sketch_width` columns; ``GradientSketch(strategy="auto")``
follows :func:`gradient_strategy`. The ``*_bytes`` functions give what those allocate, without
allocating (the memory planner reads them). Sizes in bytes; fp32 state (4 bytes a float).
"""
from __future__ import annotations

DEFAULT_MEMORY_BUDGET = 64 * 2**20  # bytes per sketch
MAX_INPUT_WIDTH = 1024  # beyond this the randomized input sketch's finalisation (O(dim·width²)) dominates


def input_strategy(dim: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> str:
    """What ``InputSketch(strategy="auto")`` takes for ``dim`` inputs: ``"covariance"`` (``dim×dim``
    fp32, exact) where it fits in ``memory_budget`` bytes, else ``"randomized"``."""
    return "covariance" if 4 * dim * dim <= memory_budget else "randomized"


def input_sketch_width(dim: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """The randomized input sketch's default width (columns of its ``dim×width`` state): as many as
    one ``dim×width`` fp32 matrix fits in ``memory_budget`` bytes, at least 1, at most ``dim`` and
    ``MAX_INPUT_WIDTH`` (e.g. LLaMA-7B's down_proj, 11008 inputs, 64 MiB: 1024)."""
    return max(1, min(dim, memory_budget // (4 * dim), MAX_INPUT_WIDTH))


def gradient_sketch_sizes(out_features: int, in_features: int, rank: int, oversample: int = 8) -> tuple[int, int]:
    """``(k, l)`` of the thin two-sided gradient sketch: ``k = r + p`` columns of ``Ĝ Ω`` (``out×k``)
    and ``l = 2k + 1`` rows of ``Ψ Ĝ`` (``l×in``), clipped to the matrix's sides."""
    k = min(rank + oversample, out_features, in_features)
    return k, min(2 * k + 1, out_features)


def gradient_strategy(out_features: int, in_features: int, rank: int, oversample: int = 8,
                      memory_budget: int = DEFAULT_MEMORY_BUDGET) -> str:
    """What ``GradientSketch(strategy="auto")`` takes: ``"dense"`` only where it fits in
    ``memory_budget`` bytes *and* costs no more per token than the thin sketch
    (``out·in ≤ (out+in)·(k+l)`` multiply-adds, ``k = r+p``, ``l = 2k+1``): small layers. Everywhere
    else the thin sketch, whose accuracy for the adapter is tested (≥ 0.99 of the top-r energy of
    a low-rank-plus-noise gradient)."""
    k, l = gradient_sketch_sizes(out_features, in_features, rank, oversample)
    dense_fits = 4 * out_features * in_features <= memory_budget
    dense_cheap = out_features * in_features <= (out_features + in_features) * (k + l)
    return "dense" if dense_fits and dense_cheap else "randomized"


def gradient_sketch_bytes(out_features: int, in_features: int, rank: int, oversample: int = 8,
                          memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """``GradientSketch(...).memory_bytes`` for the ``"auto"`` strategy, without allocating it."""
    if gradient_strategy(out_features, in_features, rank, oversample, memory_budget) == "dense":
        return 4 * out_features * in_features
    k, l = gradient_sketch_sizes(out_features, in_features, rank, oversample)
    return 4 * (out_features * k + l * in_features + in_features * k + l * out_features)


def input_sketch_bytes(dim: int, stored: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """``InputSketch(dim, V, memory_budget=...).memory_bytes`` for the ``"auto"`` strategy and a stored
    basis of ``stored`` columns (either form), without allocating it: the covariance, or the residual
    sketch, its test matrix and (exact residual, ``stored ≤ width``) the basis on the device."""
    if input_strategy(dim, memory_budget) == "covariance":
        return 4 * dim * dim
    width = input_sketch_width(dim, memory_budget)
    held = 4 * dim * stored if 0 < stored <= width else 0
    return 2 * 4 * dim * width + held
