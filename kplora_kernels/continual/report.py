"""What a task boundary reports (:class:`TaskReport`, returned by ``KeepLoRA.end_task``) and plots of
accuracy matrices (matplotlib, imported only when a plot is drawn)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BasisGrowth:
    """How one layer's protected input basis grew at a task end.

    ``appended``: input directions added over all passes (0 or more). ``energy``: the fraction, in
    [0, 1], of the task's input energy (``‖X‖_F²`` over the boundary's batches) inside the grown
    basis, as the last sketch measured it (exact for a covariance sketch; a randomized one counts its
    appended directions by their Nyström eigenvalues, a lower bound). ``passes``: data
    passes this layer took part in (≥ 1). ``width``: the randomized sketch's width (columns), None for
    an exact (covariance) sketch. ``saturated``: still short of ``eps_f`` when the pass bound
    (``max_sketch_passes``) stopped it — the task's inputs are then under-protected (also logged)."""

    appended: int
    energy: float
    passes: int
    width: int | None
    saturated: bool


@dataclass(frozen=True)
class TaskReport:
    """What ``end_task`` did for task ``task`` (its index, from 0).

    ``passes``: data passes over the boundary's batches that grew the input bases (0 when the method
    grows none; more than 1 when a randomized sketch ran out of width and the residual was sketched
    again). ``layers``: ``{layer name: BasisGrowth}`` (empty when no basis grows)."""

    task: int
    passes: int
    layers: dict = field(default_factory=dict)

    @property
    def under_protected(self) -> list[str]:
        """The layers whose grown basis holds less than ``eps_f`` of the task's input energy because
        the pass bound was reached (see :class:`BasisGrowth`)."""
        return [name for name, g in self.layers.items() if g.saturated]

    @property
    def min_energy(self) -> float:
        """The smallest captured energy fraction over the layers (NaN when no basis grew)."""
        return min((g.energy for g in self.layers.values()), default=math.nan)


def heatmap(path: str, title: str, accuracy, task_names: list, extra_columns: dict | None = None) -> None:
    """Write ``accuracy`` (rows: after training task i; columns: evaluated task j) as a PNG.

    ``extra_columns`` maps a column title to one value per row, drawn to the right of the tasks
    after a gap (the demo's base domain, the "pre-trained knowledge" that "base kept" measures).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    acc = np.array(accuracy, dtype=float)
    rows, cols = acc.shape
    extra = {k: np.asarray(v, dtype=float) for k, v in (extra_columns or {}).items()}
    for name, values in extra.items():
        if values.shape != (rows,):
            raise ValueError(f"extra column {name!r} must have one value per row ({rows}), got shape {values.shape}")
    # the extra columns sit after a blank (NaN) column, so that they do not read as tasks
    table = np.concatenate([acc, np.full((rows, 1), np.nan), *(v[:, None] for v in extra.values())], axis=1) \
        if extra else acc
    labels = list(task_names) + ([""] + list(extra) if extra else [])
    fig, ax = plt.subplots(figsize=(1.2 * table.shape[1] + 2, 1.0 * rows + 1.5))
    image = ax.imshow(np.ma.masked_invalid(table), vmin=0, vmax=1, cmap="viridis")
    for i in range(rows):
        for j in range(table.shape[1]):
            if table[i, j] == table[i, j]:
                ax.text(j, i, f"{table[i, j]:.2f}", ha="center", va="center",
                        color="white" if table[i, j] < 0.6 else "black")
    ax.set_xticks(range(table.shape[1]), labels, rotation=30, ha="right")
    ax.set_yticks(range(rows), [f"after {n}" for n in task_names[:rows]])
    ax.set_xlabel("evaluated task")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
