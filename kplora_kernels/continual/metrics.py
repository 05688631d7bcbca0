"""Continual-learning metrics from an accuracy matrix (docs/design.md §1).

``a[i][j]`` is the accuracy on task ``j`` after training task ``i`` (``T×T``, every task evaluated
after every stage). Transfer = mean over ``j ≥ 1`` of ``mean_{i<j} a[i][j]``; Average = mean over
``j`` of ``mean_i a[i][j]``; Last = ``mean_j a[T−1][j]``; BWT = ``mean_{j<T−1} (a[T−1][j] − a[j][j])``.
"""
from __future__ import annotations

import json

import torch


def _matrix(acc) -> torch.Tensor:
    """``acc`` as a float64 ``T×T`` tensor; raises ``ValueError`` naming ``acc`` for a ragged, non-square
    or non-numeric matrix."""
    if isinstance(acc, (list, tuple)):
        rows = list(acc)
        for i, row in enumerate(rows):
            if not isinstance(row, (list, tuple, torch.Tensor)) or len(row) != len(rows):
                got = len(row) if hasattr(row, "__len__") else type(row).__name__
                raise ValueError(f"acc must be a square T×T accuracy matrix (T = {len(rows)} rows): row {i} has "
                                 f"{got} entries, expected {len(rows)}")
    try:
        a = torch.as_tensor(acc, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"acc must be a square T×T matrix of numbers, got {type(acc).__name__}: {exc}") from None
    if a.dim() != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
        raise ValueError(f"the accuracy matrix must be square T×T with T ≥ 1, got shape {tuple(a.shape)}")
    return a


def transfer(acc) -> float:
    """Zero-shot transfer: accuracy on tasks before they are trained (nan for one task)."""
    a = _matrix(acc)
    cols = [a[:j, j].mean() for j in range(1, a.shape[0])]
    return float(torch.stack(cols).mean()) if cols else float("nan")


def average(acc) -> float:
    a = _matrix(acc)
    return float(a.mean(dim=0).mean())


def last(acc) -> float:
    a = _matrix(acc)
    return float(a[-1].mean())


def bwt(acc) -> float:
    """Backward transfer: how much later training changed earlier tasks (negative = forgetting)."""
    a = _matrix(acc)
    T = a.shape[0]
    if T < 2:
        return float("nan")
    return float(torch.stack([a[T - 1, j] - a[j, j] for j in range(T - 1)]).mean())


def summary(acc) -> dict:
    """All four metrics and the matrix, as plain Python values."""
    a = _matrix(acc)
    return {"transfer": transfer(a), "average": average(a), "last": last(a), "bwt": bwt(a),
            "accuracy": a.tolist()}


def to_json(acc, path=None) -> str:
    """The :func:`summary` as JSON (NaN written as null); also written to ``path`` when given."""
    data = {k: (None if isinstance(v, float) and v != v else v) for k, v in summary(acc).items()}
    text = json.dumps(data, indent=2)
    if path is not None:
        with open(path, "w") as f:
            f.write(text + "\n")
    return text
