"""What the training commands (``kplora demo``, ``mtil``, ``llava``, ``vlm``) and the controller
share: messages through :mod:`logging` (rank 0 only under torch.distributed), tqdm bars (silent
when not a terminal and on other ranks), learning-rate schedules with warmup, gradient
accumulation, bf16 autocast on CUDA, seeding, and TensorBoard scalars (``--log-dir``)."""
from __future__ import annotations

import contextlib
import logging
import math
import random
import sys
from typing import Callable, Iterable

import torch

from .config_file import ConfigError
from .distributed import is_rank0

log = logging.getLogger("kplora_kernels")

SCHEDULES = ("constant", "cosine", "onecycle")


class _RankZero(logging.Filter):
    """Under torch.distributed only rank 0 reports; warnings and errors pass on every rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or is_rank0()


class _Stdout(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stdout`` is when a record is emitted."""

    def __init__(self):
        super().__init__()
        self.addFilter(_RankZero())

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """What the ``kplora`` command does: messages of the ``kplora_kernels`` logger go to stdout,
    one line each, from rank 0 only. A library user configures :mod:`logging` as usual instead."""
    if not any(isinstance(h, _Stdout) for h in log.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def progress(iterable=None, *, total=None, desc: str = "", leave: bool = False, enabled: bool | None = None):
    """A tqdm bar on stderr, silent on ranks other than 0. ``enabled=None``: shown when stderr is a
    terminal; ``True``: always; ``False``: never (the iterable passes through)."""
    from tqdm.auto import tqdm

    disable = True if enabled is False or not is_rank0() else (None if enabled is None else False)
    return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True, disable=disable)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every GPU) generators."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_fraction: float):
    """A per-step learning-rate schedule over ``total_steps`` optimizer steps.

    ``constant``: linear warmup over ``warmup_fraction`` of the steps, then the optimizer's lr.
    ``cosine``: linear warmup, then cosine decay to 0 (the authors' LLaVA schedule, 3 % warmup).
    ``onecycle``: :class:`torch.optim.lr_scheduler.OneCycleLR` with ``max_lr`` the optimizer's lr
    and ``pct_start = warmup_fraction`` (the authors' CLIP schedule, torch's default 0.3; at least
    1.5 steps of warm-up, and a constant lr for a single step). It also cycles Adam's β₁.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int ≥ 1, got {total_steps!r}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
    if schedule == "onecycle" and total_steps >= 2:
        # OneCycleLR's warm-up must end strictly between the first and the last step
        pct = min(max(warmup_fraction, 1.5 / total_steps), 1.0 - 0.5 / total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=total_steps, pct_start=pct)
    warmup = 0 if schedule == "onecycle" else math.ceil(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "cosine":
            done = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast for CUDA when ``enabled``; nothing on other devices (the CPU trains in the
    model's dtype)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Scalars:
    """TensorBoard scalars under ``log_dir`` (rank 0 writes; nothing when ``log_dir`` is None)."""

    def __init__(self, log_dir: str | None):
        self.writer = None
        if log_dir is not None and is_rank0():
            check_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir)

    def add(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def accuracy_row(self, names: list, row: list, after_task: int) -> None:
        """Row ``after_task`` of the accuracy matrix: one scalar per evaluated task."""
        for name, value in zip(names, row):
            self.add(f"accuracy/{name}", value, after_task)
        self.add("accuracy/mean_seen", sum(row[: after_task + 1]) / (after_task + 1), after_task)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def check_tensorboard() -> None:
    """``--log-dir`` needs the ``tensorboard`` package (read by ``torch.utils.tensorboard``)."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--log-dir needs the tensorboard package: pip install tensorboard "
                          "(or pip install 'kplora_kernels[tensorboard]')")


def train_steps(loss_fn: Callable, batches: Iterable, total_batches: int, optimizer: torch.optim.Optimizer, *,
                accumulation: int = 1, scheduler=None, amp: bool = False, device=torch.device("cpu"),
                desc: str = "training", scalars: Scalars | None = None, step_offset: int = 0,
                model=None, reports: int = 10) -> dict:
    """Train on ``total_batches`` batches of ``batches``: each optimizer step averages the
    gradients of ``accumulation`` batches (the last step fewer when they do not divide), then
    steps the optimizer and ``scheduler``. ``loss_fn(batch)`` returns the loss. A bar shows the
    running loss and the learning rate; without a terminal the running loss is logged ``reports``
    times instead.
    ``model`` (DDP) skips the gradient all-reduce of all but the last batch of a step. Returns
    ``{"steps", "loss"}`` (the last running loss, an exponential average over about 25 steps).
    A NaN or infinite loss raises ``FloatingPointError`` before its step changes any parameter."""
    if accumulation < 1:
        raise ValueError(f"accumulation must be ≥ 1, got {accumulation}")
    steps = math.ceil(total_batches / accumulation)
    it = iter(batches)
    running = None
    bar = progress(total=steps, desc=desc)
    every = max(1, steps // max(1, reports))
    for step in range(steps):
        size = min(accumulation, total_batches - step * accumulation)
        optimizer.zero_grad(set_to_none=True)
        total = None
        for micro in range(size):
            batch = next(it)
            sync = micro == size - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                with autocast(device, amp):
                    loss = loss_fn(batch)
                (loss / size).backward()
            total = loss.detach().float() if total is None else total + loss.detach().float()
        value, lr = total.item() / size, optimizer.param_groups[0]["lr"]
        if not math.isfinite(value):  # before the step: the parameters stay as they were
            raise FloatingPointError(f"{desc}: the loss is {value} at step {step + 1} of {steps} "
                                     f"(learning rate {lr:.3g}); lower the lr"
                                     + (" or set amp: false" if amp and device.type == "cuda" else ""))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        running = value if running is None else 0.96 * running + 0.04 * value
        bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update()
        if scalars is not None:
            scalars.add("train/loss", value, step_offset + step)
            scalars.add("train/lr", lr, step_offset + step)
        if bar.disable and reports > 0 and ((step + 1) % every == 0 or step + 1 == steps):
            log.info(f"{desc}: step {step + 1}/{steps}, running loss {running:.4f}, lr {lr:.3g}")
    bar.close()
    return {"steps": steps, "loss": running}
