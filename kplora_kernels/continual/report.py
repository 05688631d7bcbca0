"""Plots of accuracy matrices (matplotlib, imported only when a plot is drawn)."""
from __future__ import annotations


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
