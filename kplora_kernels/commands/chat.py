"""What ``kplora llava`` and ``kplora vlm`` share: the task list, the checks before any model is
loaded, batches encoded as they are read, the training run over the tasks (one rank's shard each
under ``torchrun``, DDP or FSDP2), evaluation by exact match of greedy answers and the export of the
merged model as a ``save_pretrained`` folder.

The task list is a JSON list ``[{"name": …, "train": FILE, "test": FILE}, …]`` (paths relative to the
list); each file holds LLaVA-style conversations ``{"image": PATH, "conversations": [{"from": "human",
"value": "<image>\\n…"}, {"from": "gpt", "value": …}, …]}``.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config_file import ConfigError, require_packages, result_settings, setting
from ..continual import KeepLoRA, KeepLoRAConfig
from ..distributed import barrier, data_parallel, init_from_env, is_distributed, is_rank0, rank_shard
from ..training import SCHEDULES, autocast, check_tensorboard, progress, seed_everything
from .common import fit_task, read_json, run_sequence

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def normalize(answer: str) -> str:
    """An answer as exact match compares it: lower case, runs of white space as one space, no
    surrounding space, no final period."""
    return re.sub(r"\s+", " ", answer.strip().lower()).rstrip(".").strip()


def read_tasks(path: str) -> list[dict]:
    """``[{"name", "train": [conversations], "test": [conversations]}]`` from the task list at ``path``.
    Raises ``ConfigError`` naming the file when the list or a task file is missing, does not parse, or
    is not a non-empty list of the expected objects."""
    if not os.path.isfile(path):
        raise ConfigError(f"task list not found: {path}")
    tasks = read_json(path)
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks) or not tasks:
        raise ConfigError(f"{path} must hold a non-empty list of {{name, train, test}} objects")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for task in tasks:
        missing = {"name", "train", "test"} - set(task)
        if missing:
            raise ConfigError(f"{path}: every task needs name, train and test; {task} lacks {sorted(missing)}")
        files = {}
        for split in ("train", "test"):
            file = os.path.join(base, task[split])
            if not os.path.isfile(file):
                raise ConfigError(f"{path}: task {task['name']!r}: {split} file not found: {file}")
            files[split] = read_json(file)
            if not isinstance(files[split], list) or not files[split]:
                raise ConfigError(f"{file} must hold a non-empty list of conversations")
        out.append({"name": task["name"], **files})
    return out


def check_inputs(args, command: str) -> list[dict]:
    """Everything checked before a model is loaded: the packages, ``--log-dir``'s tensorboard, the task
    list, ``--export`` (a folder; not under FSDP2, whose weights are sharded) and the model folder.
    Returns the tasks (:func:`read_tasks`); raises ``ConfigError``."""
    require_packages(command, {"transformers": "transformers", "PIL": "pillow", "matplotlib": "matplotlib"}, "hf")
    if args.log_dir is not None:
        check_tensorboard()
    tasks = read_tasks(args.data)
    export = getattr(args, "export", None)
    if export is not None and is_distributed() and args.strategy == "fsdp2":
        raise ConfigError("--export with --strategy fsdp2 is not supported (the weights are sharded); "
                          "export from a single process: rerun the finished run without torchrun and with --export")
    if export is not None and os.path.isfile(export):
        raise ConfigError(f"--export must be a folder, got the file {export}")
    if not os.path.isdir(args.model):
        raise ConfigError(f"model folder not found: {args.model}")
    return tasks


def start(args, cfg, log) -> tuple[torch.device, float]:
    """The process group and device (``torchrun`` or one process), the seeds; ``(device, start time)``."""
    device = init_from_env(args.device)
    seed_everything(cfg.seed)
    log(f"loading {args.model} ({cfg.dtype}) on {device}")
    return device, time.perf_counter()


class Batches:
    """A task's batches, encoded when read (nothing held): ``len``, iteration and slicing (a prefix),
    as :meth:`KeepLoRA.begin_task` and :meth:`~KeepLoRA.end_task` take them. ``data.batch(samples,
    frames)`` encodes one group of samples."""

    def __init__(self, data, groups: list[list[dict]], frames: int | None = None):
        self.data, self.groups, self.frames = data, groups, frames

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Batches(self.data, self.groups[index], self.frames)
        return self.data.batch(self.groups[index], self.frames)

    def __iter__(self):
        return (self.data.batch(g, self.frames) for g in self.groups)


def to_device(batch: dict, device, dtype) -> dict:
    """``batch`` on ``device``, its floating-point tensors (pixels) in ``dtype``."""
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in batch.items()}


@dataclass
class ChatSettings:
    """The training settings llava and vlm share (``--config`` keys); defaults: the authors'
    LLaVA-1.5-7B settings (r = 32, α = r/4, ε_w = 0.6, lr 2e-4, cosine schedule with 3 % warmup), bf16."""

    method: str = KeepLoRAConfig.setting("method")
    rank: int = KeepLoRAConfig.setting("rank", 32)
    alpha: float = KeepLoRAConfig.setting("alpha", 8.0)
    eps_w: float = KeepLoRAConfig.setting("eps_w", 0.6, "ε_w of the language model's principal subspaces")
    eps_f: float = KeepLoRAConfig.setting("eps_f", 0.99)
    lr: float = setting(2e-4, "peak learning rate (AdamW)", gt=0)
    lr_schedule: str = setting("cosine", "per-step schedule within a task (the authors: cosine)", choices=SCHEDULES)
    warmup_fraction: float = setting(0.03, "share of a task's steps spent warming up", ge=0, lt=1)
    batch_size: int = setting(4, "conversations per batch (per rank under torchrun)", ge=1)
    gradient_accumulation: int = setting(1, "batches averaged per optimizer step", ge=1)
    epochs: int = setting(1, "passes over each task's training set", ge=1)
    amp: bool = setting(True, "bf16 autocast for training and evaluation on CUDA (no effect on the CPU)")
    gradient_batches: int = setting(16, "batches for the task-start gradient", ge=1)
    subspace_batches: int = setting(16, "batches for the task-end input subspace", ge=1)
    max_new_tokens: int = setting(16, "longest generated answer in evaluation", ge=1)
    max_eval_samples: int | None = setting(None, "test conversations per task (null: all)", ge=1)
    dtype: str = setting("bf16", "dtype the model is loaded in", choices=tuple(DTYPES))
    gradient_checkpointing: bool = setting(True, "recompute activations in the backward (less memory)",
                                           affects_results=False)
    seed: int = setting(0, "seed of shuffling and the controller", ge=0)


@dataclass
class Chat:
    """A loaded model and what the shared run needs of its family.

    ``data``: ``batch(samples, frames=None)`` → model inputs with ``labels`` (−100 off the answers),
    ``question(sample)`` → ``(generate inputs, reference answer)``, ``tokenizer``.
    ``wrap()``: the controller of a fresh run. ``units``: FSDP2's units (module paths).
    ``savers``: what ``--export`` saves beside the model (tokenizer, processor…). ``title``: of
    ``results.json``'s heatmap."""

    model: nn.Module
    data: object
    wrap: Callable[[], KeepLoRA]
    units: re.Pattern
    savers: tuple
    title: str


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing (non-reentrant) through transformers' switch of either major version."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def run(args, cfg, chat: Chat, tasks: list[dict], device, started: float, log) -> dict:
    """Train ``tasks`` in order on ``chat.model`` (resuming ``args.output``), evaluate every task after
    every task, write ``results.json`` and, with ``args.export``, the merged model."""
    model, data = chat.model, chat.data
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    names = [t["name"] for t in tasks]
    parallel = {}

    def loss_fn(m, batch):
        """``loss(model, batch)``: the language-modelling loss on the answers of an encoded batch."""
        return m(**to_device(batch, device, model.dtype)).loss

    def ready(kl):
        parallel["model"] = data_parallel(model, args.strategy, device, chat.units)

    frames = getattr(cfg, "video_frames", None)
    boundary = getattr(cfg, "boundary_video_frames", None) or frames

    def train(t, kl, scalars, state):
        torch.manual_seed(cfg.seed + t)
        samples = rank_shard(tasks[t]["train"])
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(cfg.seed + t)).tolist()
        groups = [[samples[i] for i in order[k:k + cfg.batch_size]] for k in range(0, len(order), cfg.batch_size)]
        if not groups:
            raise ConfigError(f"task {names[t]!r} has no training conversation for this rank")
        batches, passes = Batches(data, groups), Batches(data, groups, boundary)
        fraction = getattr(cfg, "gradient_fraction", None)
        first = math.ceil(fraction * len(groups)) if fraction else cfg.gradient_batches
        epochs = (b for _ in range(cfg.epochs) for b in batches)
        result = fit_task(kl, model, loss_fn, epochs, cfg.epochs * len(batches), cfg,
                          start=(passes[:first], 1.0), end=(passes[:cfg.subspace_batches], 1.0), device=device,
                          desc=f"task {t} ({names[t]})", scalars=scalars, step_offset=state["global_step"],
                          trained=parallel["model"])
        state["global_step"] += result["steps"]
        return f"final running loss {result['loss']:.4f}"

    def report(run_state, rows, state):
        result = run_state.finish(names, rows, chat.title)
        log(f"Transfer {100 * result['transfer']:.1f}  Average {100 * result['average']:.1f}  "
            f"Last {100 * result['last']:.1f}  BWT {100 * result['bwt']:+.1f}")
        return result

    identity = {"tasks": names, "model": os.path.realpath(args.model), "config": result_settings(cfg)}
    return run_sequence(output=args.output, identity=identity, names=names, model=model, wrap=chat.wrap,
                        train=train, evaluate=lambda j: evaluate(model, data, tasks[j], cfg, device),
                        export=lambda kl: export(kl, getattr(args, "export", None), chat.savers, log),
                        report=report, log=log, log_dir=args.log_dir, started=started,
                        records={"global_step": 0}, metric="exact match", ready=ready)


def export(kl: KeepLoRA, folder: str | None, savers, log) -> None:
    """``--export``: the plain model after the last task (:meth:`KeepLoRA.merge_and_unload`) and
    ``savers`` (tokenizer, processor…) as a ``save_pretrained`` folder that transformers loads without
    this package. Rank 0 writes."""
    if folder is None:
        return
    model = kl.merge_and_unload()
    if is_rank0():
        os.makedirs(folder, exist_ok=True)
        model.save_pretrained(folder)
        for saver in savers:
            saver.save_pretrained(folder)
        log(f"exported the merged model to {folder} (save_pretrained)")
    barrier()


@torch.no_grad()
def evaluate(model, data, task: dict, cfg, device) -> float:
    """Exact match in [0, 1] of greedy answers to the first question of each test conversation (case,
    surrounding space and a final period ignored: :func:`normalize`)."""
    model.eval()
    samples = task["test"][: cfg.max_eval_samples] if cfg.max_eval_samples else task["test"]
    tokenizer = data.tokenizer
    correct = 0
    bar = progress(samples, total=len(samples), desc=f"evaluating {task['name']}")
    for seen, sample in enumerate(bar, 1):
        inputs, answer = data.question(sample)
        inputs = to_device(inputs, device, model.dtype)
        with autocast(device, cfg.amp):
            out = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                 else tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += normalize(text) == normalize(answer)
        bar.set_postfix(exact_match=f"{correct / seen:.3f}", refresh=False)
    return correct / max(len(samples), 1)


def add_engine_arguments(parser, unit: str, exported: str) -> None:
    """``--strategy`` (DDP, or FSDP2 with one ``unit`` per shard) and ``--export DIR`` (the merged plain
    model with ``exported``), the options llava and vlm share."""
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp",
                        help=f"under torchrun: DDP, or FSDP2 (fully_shard per {unit})")
    parser.add_argument("--export", metavar="DIR",
                        help=f"after the last task, write the merged plain model ({exported}) to DIR; loads "
                             "without this package")
