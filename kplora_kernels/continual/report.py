"""Plots of accuracy matrices (matplotlib, imported only when a plot is drawn)."""
from __future__ import annotations


def heatmap(path: str, title: str, accuracy, task_names: list) -> None:
    """Write ``accuracy`` (rows: after training task i; columns: evaluated task j) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    acc = np.array(accuracy, dtype=float)
    rows, cols = acc.shape
    fig, ax = plt.subplots(figsize=(1.2 * cols + 2, 1.0 * rows + 1.5))
    image = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis")
    for i in range(rows):
        for j in range(cols):
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", color="white" if acc[i, j] < 0.6 else "black")
    ax.set_xticks(range(cols), task_names, rotation=30, ha="right")
    ax.set_yticks(range(rows), [f"after {n}" for n in task_names[:rows]])
    ax.set_xlabel("evaluated task")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
