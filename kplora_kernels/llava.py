"""``kplora llava``: continual instruction tuning of a transformers ``LlavaForConditionalGeneration``.

The task sequence is a JSON list ``[{"name": …, "train": FILE, "test": FILE}, …]`` (paths relative
to that list); each file holds LLaVA-style conversations
``{"image": PATH, "conversations": [{"from": "human", "value": "<image>\\n…"}, {"from": "gpt", …}]}``
with image paths relative to ``--image-root``. Trains with the controller (``preset("llava")``:
q, k, v, o, gate, up, down of every language-model layer; the projector trained plainly), in bf16
with gradient checkpointing by default, evaluates every task after every task by exact match of
greedy answers, and resumes after the last finished task like ``kplora mtil``. Under ``torchrun``
each rank trains on its shard through DDP or FSDP2 (``--strategy``) and the controller keeps the
state identical on all ranks.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass

import torch

from .config_file import ConfigError, load_settings, require_packages, result_settings, setting
from .continual import METHODS, KeepLoRA, preset
from .continual.runs import ResumableRun
from .distributed import barrier, data_parallel, init_from_env, is_distributed, is_rank0, rank_shard
from .training import (SCHEDULES, Scalars, add_run_arguments, autocast, check_tensorboard, make_scheduler, progress,
                       seed_everything, train_steps)
from .training import log as logger

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LLaVAConfig:
    """Training settings (``--config`` keys). Defaults: the authors' LLaVA-1.5-7B settings (r = 32,
    α = r/4, ε_w = 0.6, lr 2e-4, cosine schedule with 3 % warmup), bf16."""

    method: str = setting("keeplora++", "the continual-learning method", choices=METHODS)
    rank: int = setting(32, "adapter rank r", ge=1)
    alpha: float = setting(8.0, "adapter scale α (the update is α/r·s·BA)", gt=0)
    eps_w: float = setting(0.6, "ε_w of the principal subspaces", gt=0, le=1)
    eps_f: float = setting(0.99, "ε_f of the task-feature (GPM) expansion", gt=0, le=1)
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


def normalize(answer: str) -> str:
    return re.sub(r"\s+", " ", answer.strip().lower()).rstrip(".").strip()


class Conversations:
    """Encodes LLaVA conversations: ``USER: {human} ASSISTANT: {gpt}</s>`` turns, the ``<image>``
    token expanded to the vision tower's patch count, labels only on the answers."""

    def __init__(self, model, tokenizer, image_processor, image_root: str):
        cfg = model.config
        self.tokenizer, self.image_processor, self.image_root = tokenizer, image_processor, image_root
        self.image_token_id = cfg.image_token_id
        patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        self.image_tokens = patches + (1 if cfg.vision_feature_select_strategy == "full" else 0)

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        out = []
        for i in ids:
            out.extend([i] * self.image_tokens if i == self.image_token_id else [i])
        return out

    def image(self, path: str) -> torch.Tensor:
        from PIL import Image

        full = os.path.join(self.image_root, path)
        if not os.path.isfile(full):
            raise ConfigError(f"image not found: {full}")
        return self.image_processor(Image.open(full).convert("RGB"), return_tensors="pt").pixel_values[0]

    def training_example(self, sample: dict):
        ids = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        labels = [-100] * len(ids)
        turns = sample["conversations"]
        for human, gpt in zip(turns[0::2], turns[1::2]):
            prompt = self._ids(f"USER: {human['value']} ASSISTANT:")
            answer = self._ids(" " + gpt["value"]) + [self.tokenizer.eos_token_id]
            ids += prompt + answer
            labels += [-100] * len(prompt) + answer
        return torch.tensor(ids), torch.tensor(labels), self.image(sample["image"])

    def question(self, sample: dict):
        human, gpt = sample["conversations"][0], sample["conversations"][1]
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return torch.tensor(bos + self._ids(f"USER: {human['value']} ASSISTANT:")), self.image(sample["image"]), gpt["value"]

    def collate(self, examples):
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        length = max(len(ids) for ids, _, _ in examples)
        input_ids = torch.full((len(examples), length), pad)
        labels = torch.full((len(examples), length), -100)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, (ids, lab, _) in enumerate(examples):
            input_ids[row, :len(ids)], labels[row, :len(ids)], mask[row, :len(ids)] = ids, lab, 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
                "pixel_values": torch.stack([img for _, _, img in examples])}


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from None


def read_tasks(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise ConfigError(f"task list not found: {path}")
    tasks = _read_json(path)
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
            files[split] = _read_json(file)
            if not isinstance(files[split], list) or not files[split]:
                raise ConfigError(f"{file} must hold a non-empty list of conversations")
        out.append({"name": task["name"], **files})
    return out


def run(args, cfg: LLaVAConfig, log=None) -> dict:
    log = log or logger.info
    require_packages("llava", {"transformers": "transformers", "PIL": "pillow", "matplotlib": "matplotlib"}, "hf")
    if args.log_dir is not None:
        check_tensorboard()
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    tasks = read_tasks(args.data)
    export = getattr(args, "export", None)
    if export is not None and is_distributed() and args.strategy == "fsdp2":
        raise ConfigError("--export with --strategy fsdp2 is not supported (the weights are sharded); "
                          "export from a single process: rerun the finished run without torchrun and with --export")
    if export is not None and os.path.isfile(export):
        raise ConfigError(f"--export must be a folder, got the file {export}")
    if not os.path.isdir(args.model):
        raise ConfigError(f"model folder not found: {args.model}")
    if _needs_vlm(args.model):
        return _as_vlm(args, cfg, log)
    device = init_from_env(args.device)
    seed_everything(cfg.seed)
    start = time.perf_counter()
    log(f"loading {args.model} ({cfg.dtype}) on {device}")
    try:
        model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=DTYPES[cfg.dtype]).to(device)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        image_processor = AutoImageProcessor.from_pretrained(args.model)
    except OSError as exc:
        raise ConfigError(f"cannot load the model from {args.model}: {exc}") from None
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    data = Conversations(model, tokenizer, image_processor, args.image_root)
    names = [t["name"] for t in tasks]
    run_state = ResumableRun(args.output, {"tasks": names, "model": os.path.realpath(args.model),
                                           "config": result_settings(cfg)})
    previous = run_state.previous()
    if previous:
        kl = KeepLoRA.from_checkpoint(model, run_state.checkpoint)
        rows, step = previous["rows"], previous.get("global_step", 0)
        if len(rows) == len(tasks):
            log(f"already complete: {args.output} holds all {len(rows)} tasks; writing the results again")
            _export(kl, export, tokenizer, image_processor, log)
            return _finish(run_state, names, rows, log)
        log(f"resuming after task {len(rows)} ({names[len(rows) - 1]})")
    else:
        rows, step = [], 0
        log(f"wrapping the model ({cfg.method}: principal subspaces of every adapted weight)")
        kl = KeepLoRA(model, preset("llava", method=cfg.method, rank=cfg.rank, alpha=cfg.alpha, eps_f=cfg.eps_f,
                                    eps_w={"default": cfg.eps_w}, seed=cfg.seed),
                      bases_cache_dir=getattr(args, "bases_cache", None))
    log(f"ready in {time.perf_counter() - start:.0f} s: {len(kl.layers)} adapted linears, "
        f"{sum(p.numel() for p in kl.trainable_parameters())} trainable parameters")
    # the blocks of the language model are FSDP2's units
    trained = data_parallel(model, args.strategy, device, re.compile(r".*language_model\.layers\.\d+"))

    def loss_fn(m, batch):
        """``loss(model, batch)``: the language-modelling loss on the answers of a collated batch."""
        return m(**{k: v.to(device) for k, v in batch.items()}).loss

    scalars = Scalars(args.log_dir)
    try:
        for t in range(len(rows), len(tasks)):
            torch.manual_seed(cfg.seed + t)
            examples = [data.training_example(s) for s in rank_shard(tasks[t]["train"])]
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed + t)).tolist()
            batches = [data.collate([examples[i] for i in order[k:k + cfg.batch_size]])
                       for k in range(0, len(order), cfg.batch_size)]
            if not batches:
                raise ConfigError(f"task {names[t]!r} has no training conversation for this rank")
            model.train()
            kl.begin_task(batches[: cfg.gradient_batches], loss_fn)
            opt = torch.optim.AdamW(kl.trainable_parameters(), lr=cfg.lr, weight_decay=0.0)
            kl.register_projection_hook(opt)
            total = cfg.epochs * len(batches)
            steps = -(-total // cfg.gradient_accumulation)
            schedule = make_scheduler(opt, cfg.lr_schedule, steps, cfg.warmup_fraction)
            epochs = (b for _ in range(cfg.epochs) for b in batches)
            # a method's extra loss (O-LoRA), kept out of loss_fn, which begin_task also uses
            trained_task = train_steps(lambda batch: loss_fn(trained, batch) + kl.regularization(), epochs, total, opt,
                                       accumulation=cfg.gradient_accumulation, scheduler=schedule, amp=cfg.amp,
                                       device=device, desc=f"task {t} ({names[t]})", scalars=scalars,
                                       step_offset=step, model=trained)
            step += trained_task["steps"]
            kl.end_task(batches[: cfg.subspace_batches], loss_fn)
            rows.append([evaluate(model, data, task, cfg, device) for task in tasks])
            scalars.accuracy_row(names, rows[-1], t)
            run_state.record(kl, rows, global_step=step)
            log(f"task {t} ({names[t]}): final running loss {trained_task['loss']:.4f}; exact match " +
                ", ".join(f"{n} {a:.3f}" for n, a in zip(names, rows[-1])))
        _export(kl, export, tokenizer, image_processor, log)
        return _finish(run_state, names, rows, log)
    finally:
        scalars.close()


def _needs_vlm(folder: str) -> bool:
    """A folder this command's own USER/ASSISTANT encoding does not serve: another family than LLaVA
    (Qwen2-VL, LLaVA-NeXT, …) or one whose processor carries a chat template (``kplora vlm`` renders
    every sample with it)."""
    config = os.path.join(folder, "config.json")
    model_type = _read_json(config).get("model_type") if os.path.isfile(config) else None
    if model_type not in (None, "llava") or os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        return True
    processor = os.path.join(folder, "processor_config.json")
    return os.path.isfile(processor) and bool(_read_json(processor).get("chat_template"))


def _as_vlm(args, cfg: LLaVAConfig, log) -> dict:
    """``kplora llava`` on a folder for :mod:`kplora_kernels.vlm`: the same run with these settings
    (LLaVA's defaults) and ``--image-root`` as the media root."""
    import dataclasses

    from . import vlm

    known = {f.name for f in dataclasses.fields(vlm.VLMConfig)}
    settings = vlm.VLMConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in known})
    args.media_root = args.image_root
    (log or logger.info)(f"{args.model} has a chat template or is not a LLaVA-1.5 model: running it as kplora vlm")
    return vlm.run(args, settings, log, command="llava")


def _export(kl: KeepLoRA, folder: str | None, tokenizer, image_processor, log) -> None:
    """``--export``: the plain model after the last task (:meth:`KeepLoRA.merge_and_unload`) as a
    ``save_pretrained`` folder with its tokenizer and image processor, loadable by
    ``LlavaForConditionalGeneration.from_pretrained`` without this package. Rank 0 writes."""
    if folder is None:
        return
    model = kl.merge_and_unload()
    if is_rank0():
        os.makedirs(folder, exist_ok=True)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        image_processor.save_pretrained(folder)
        log(f"exported the merged model to {folder} (save_pretrained)")
    barrier()


def _finish(run_state, names, rows, log) -> dict:
    result = run_state.finish(names, rows, "LLaVA continual instruction tuning")
    log(f"Transfer {100 * result['transfer']:.1f}  Average {100 * result['average']:.1f}  "
        f"Last {100 * result['last']:.1f}  BWT {100 * result['bwt']:+.1f}")
    return result


@torch.no_grad()
def evaluate(model, data: Conversations, task: dict, cfg: LLaVAConfig, device) -> float:
    """Exact match of greedy answers (case, surrounding space and a final period ignored)."""
    model.eval()
    samples = task["test"][: cfg.max_eval_samples] if cfg.max_eval_samples else task["test"]
    correct = 0
    bar = progress(samples, total=len(samples), desc=f"evaluating {task['name']}")
    for seen, sample in enumerate(bar, 1):
        ids, image, answer = data.question(sample)
        ids = ids.unsqueeze(0).to(device)
        with autocast(device, cfg.amp):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                                 pixel_values=image.unsqueeze(0).to(device, model.dtype), do_sample=False,
                                 pad_token_id=data.tokenizer.pad_token_id or data.tokenizer.eos_token_id)
        text = data.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        correct += normalize(text) == normalize(answer)
        bar.set_postfix(exact_match=f"{correct / seen:.3f}", refresh=False)
    return correct / max(len(samples), 1)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="a LLaVA model folder (save_pretrained layout)")
    parser.add_argument("--data", required=True, help="the task list: JSON [{name, train, test}, …]")
    parser.add_argument("--image-root", required=True, help="folder the conversations' image paths start from")
    add_run_arguments(parser, LLaVAConfig, output="llava_output",
                      device_help="cuda or cpu (default: cuda:LOCAL_RANK when available)")
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp",
                        help="under torchrun: DDP, or FSDP2 (fully_shard per language-model layer)")
    parser.add_argument("--export", metavar="DIR",
                        help="after the last task, write the merged plain model (save_pretrained, with the "
                             "tokenizer and image processor) to DIR; loads without this package")


def load_config(args) -> LLaVAConfig:
    """The settings, checked before any data or model is loaded."""
    return load_settings(LLaVAConfig, args.config)


def main(args) -> dict:
    return run(args, load_config(args))
