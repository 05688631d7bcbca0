"""Bookkeeping of a resumable task-sequence run (``kplora mtil``, ``kplora llava``): after every
task the controller checkpoint and ``progress.json`` (the accuracy rows so far) are written
atomically; a rerun with the same output folder and the same result-changing settings continues
after the last task."""
from __future__ import annotations

import json
import os

from ..config_file import ConfigError
from ..distributed import is_rank0
from . import metrics


def write_json(path: str, data) -> None:
    """Write JSON atomically (temp file + rename); NaN becomes null."""
    from ..atomic import write_atomically

    clean = lambda v: None if isinstance(v, float) and v != v else v  # noqa: E731
    data = data if not isinstance(data, dict) else {k: clean(v) for k, v in data.items()}

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
    write_atomically(path, write, what="JSON record")


_ABSENT = object()


def differences(old, new, prefix: str = "") -> list[str]:
    """``"key (A there, B now)"`` for every key whose value differs between two nested mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += differences(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{prefix}{key}.")
        return out
    if old == new:
        return []
    show = lambda v: "absent" if v is _ABSENT else json.dumps(v)  # noqa: E731
    return [f"{prefix.rstrip('.')} ({show(old)} there, {show(new)} now)"]


class ResumableRun:
    """``identity`` holds what changes a run's results (data, model, weights, result-changing
    settings); a rerun into the same ``output`` must match it to resume."""

    def __init__(self, output: str, identity: dict):
        if os.path.exists(output) and not os.path.isdir(output):
            raise ConfigError(f"--output {output} exists and is not a folder")
        os.makedirs(output, exist_ok=True)
        self.output, self.identity = output, identity
        self.progress_path = os.path.join(output, "progress.json")
        self.checkpoint = os.path.join(output, "controller.safetensors")

    def previous(self) -> dict | None:
        """The saved progress (``rows`` and whatever else was recorded), or None for a fresh run."""
        if not os.path.isfile(self.progress_path):
            return None
        with open(self.progress_path) as f:
            progress = json.load(f)
        changed = differences(progress.get("identity", {}), self.identity)
        if changed:
            raise ConfigError(f"{self.output} holds a run with other settings: {'; '.join(changed)}; "
                              "rerun with those settings to resume, or use another --output")
        if not os.path.isfile(self.checkpoint):
            raise ConfigError(f"{self.progress_path} exists but {self.checkpoint} is missing")
        return progress

    def record(self, controller, rows: list, **extra) -> None:
        controller.save(self.checkpoint)  # rank 0 writes, all ranks wait
        if is_rank0():
            write_json(self.progress_path, {"identity": self.identity, "rows": rows, **extra})

    def finish(self, names: list, rows: list, title: str, **extra) -> dict:
        """``results.json`` (matrix, metrics, per-dataset rows) and ``heatmap.png``."""
        from .report import heatmap

        summary = metrics.summary(rows)
        per_task = {n: {"transfer": (sum(rows[i][j] for i in range(j)) / j) if j else None,
                        "last": rows[-1][j], "average": sum(r[j] for r in rows) / len(rows)}
                    for j, n in enumerate(names)}
        result = {**summary, "tasks": names, "per_task": per_task, **extra}
        if is_rank0():
            write_json(os.path.join(self.output, "results.json"), result)
            heatmap(os.path.join(self.output, "heatmap.png"), f"{title}: Last {100 * summary['last']:.1f}", rows, names)
        return result
