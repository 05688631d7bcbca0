"""The skeleton the task-sequence commands share (``kplora mtil``, ``llava``, ``vlm``): their common
options, resuming or wrapping the model, one task of the controller's lifecycle (task-start
gradient, AdamW with the projection hook and a per-step schedule, training, task-end subspace),
the evaluation of every task after every task, ``progress.json`` after each task, TensorBoard
scalars, the export and the final ``results.json``."""
from __future__ import annotations

import json
import math
import time
from typing import Callable

import torch

from ..config_file import ConfigError, describe_settings
from ..continual import KeepLoRA
from ..continual.runs import ResumableRun
from ..training import Scalars, make_scheduler, train_steps


def add_run_arguments(parser, settings, *, output: str, device_help: str) -> None:
    """The options every resumable task-sequence command shares: ``--config`` (its keys, those of the
    dataclass ``settings``, listed in the epilog), ``--output`` (default ``output``), ``--log-dir``,
    ``--device`` (``device_help``) and ``--bases-cache``."""
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "settings of --config (JSON or YAML; key = default: meaning [allowed]):\n" + describe_settings(settings)
    parser.add_argument("--config", help="JSON or YAML with any of the settings below")
    parser.add_argument("--output", default=output, help="results, checkpoint and progress (resumable)")
    parser.add_argument("--log-dir", help="write TensorBoard scalars here (loss, lr, accuracy matrix)")
    parser.add_argument("--device", help=device_help)
    parser.add_argument("--bases-cache", metavar="DIR",
                        help="cache the principal subspaces of the pre-trained weights here (safetensors keyed by "
                             "each weight's fingerprint): a second run on the same model skips the decompositions")


def read_json(path: str):
    """The JSON value in the file at ``path``; a file that does not parse is a ``ConfigError`` naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from None


def fit_task(kl: KeepLoRA, model, loss_fn: Callable, batches, total: int, cfg, *, start, end, device, desc: str,
             scalars: Scalars, step_offset: int, trained=None) -> dict:
    """One task of the controller's lifecycle on ``model`` (wrapped by ``kl``): ``begin_task`` on
    ``start`` = ``(batches, fraction)``, a fresh AdamW (``cfg.lr``, ``cfg.weight_decay`` or 0) over the
    trainable parameters with the projection hook and ``cfg.lr_schedule`` (``cfg.warmup_fraction``),
    ``total`` batches of ``batches`` averaged ``cfg.gradient_accumulation`` at a time with the loss
    ``loss_fn(trained, batch) + kl.regularization()`` (``trained``: the DDP/FSDP2 wrapper, else
    ``model``), then ``end_task`` on ``end``. ``loss_fn(model, batch)`` also serves the boundary
    passes, which is why the method's extra loss is added here and not in it.

    Returns :func:`~kplora_kernels.training.train_steps`' ``{"steps", "loss"}`` and ``"seconds"``, the
    wall time of the training steps alone."""
    trained = model if trained is None else trained
    model.train()
    kl.begin_task(start[0], loss_fn, fraction=start[1])
    opt = torch.optim.AdamW(kl.trainable_parameters(), lr=cfg.lr, weight_decay=getattr(cfg, "weight_decay", 0.0))
    kl.register_projection_hook(opt)
    schedule = make_scheduler(opt, cfg.lr_schedule, math.ceil(total / cfg.gradient_accumulation), cfg.warmup_fraction)
    began = time.perf_counter()
    result = train_steps(lambda batch: loss_fn(trained, batch) + kl.regularization(), batches, total, opt,
                         accumulation=cfg.gradient_accumulation, scheduler=schedule, amp=cfg.amp, device=device,
                         desc=desc, scalars=scalars, step_offset=step_offset, model=trained)
    result["seconds"] = time.perf_counter() - began
    kl.end_task(end[0], loss_fn, fraction=end[1])
    return result


def run_sequence(*, output: str, identity: dict, names: list, model, wrap: Callable[[], KeepLoRA],
                 train: Callable, evaluate: Callable[[int], float], export: Callable[[KeepLoRA], None],
                 report: Callable, log: Callable, log_dir: str | None, started: float, records: dict,
                 metric: str = "accuracy", ready: Callable[[KeepLoRA], None] | None = None) -> dict:
    """Train the tasks ``names`` in order, resuming from ``output`` where a run with the same
    ``identity`` stopped (:class:`~kplora_kernels.continual.runs.ResumableRun`; a different one is
    refused with each differing key).

    A fresh run wraps ``model`` with ``wrap()``; a resumed one loads ``output``'s checkpoint into it.
    ``ready(kl)`` runs once before the first task trained (e.g. the DDP/FSDP2 wrapping). For each task
    ``t`` not yet done: ``train(t, kl, scalars, state)`` trains it and returns a phrase for the log
    line, ``evaluate(j)`` gives the accuracy in [0, 1] on every task ``j``, and the row, ``kl`` and
    ``state`` are saved. ``state`` starts as ``records`` (e.g. ``{"global_step": 0}``) or what the
    resumed run saved, and is written to ``progress.json`` beside the rows. At the end
    ``export(kl)`` runs and ``report(run, rows, state)`` writes and returns the results; a run already
    complete only does these two. ``started``: ``time.perf_counter()`` when the command began."""
    run = ResumableRun(output, identity)
    previous = run.previous()
    if previous:
        kl = KeepLoRA.from_checkpoint(model, run.checkpoint)
        rows = previous["rows"]
        state = {key: previous.get(key, default) for key, default in records.items()}
        if len(rows) == len(names):
            log(f"already complete: {output} holds all {len(rows)} tasks; writing the results again")
            export(kl)
            return report(run, rows, state)
        log(f"resuming after task {len(rows)} ({names[len(rows) - 1]})")
    else:
        rows, state = [], json.loads(json.dumps(records))  # a copy: the caller's defaults stay as given
        kl = wrap()
    log(f"ready in {time.perf_counter() - started:.0f} s: {len(kl.layers)} adapted linears, "
        f"{sum(p.numel() for p in kl.trainable_parameters())} trainable parameters")
    if ready is not None:
        ready(kl)
    scalars = Scalars(log_dir)
    try:
        for t in range(len(rows), len(names)):
            summary = train(t, kl, scalars, state)
            rows.append([evaluate(j) for j in range(len(names))])
            scalars.accuracy_row(names, rows[-1], t)
            run.record(kl, rows, **state)
            log(f"task {t} ({names[t]}): {summary}; {metric} " +
                ", ".join(f"{n} {a:.3f}" for n, a in zip(names, rows[-1])))
        export(kl)
        result = report(run, rows, state)
        for key in ("transfer", "average", "last", "bwt"):
            if result[key] == result[key]:  # NaN (one task: no transfer, no BWT) is not logged
                scalars.add(f"metrics/{key}", result[key], len(rows) - 1)
    finally:
        scalars.close()
    return result
