"""``kplora vlm``: continual instruction tuning of any transformers vision-language model, images and video.

The model is loaded with ``AutoModelForImageTextToText`` and its ``AutoProcessor`` (tokenizer, image
and video processors, chat template), so every family gets its own special tokens, pixel layout and
positions (Qwen2-VL's M-RoPE grids, LLaVA-NeXT's tiles, video frames). The task list is the JSON of
``kplora llava``: ``[{"name": …, "train": FILE, "test": FILE}, …]``, each file a list of LLaVA-style
conversations with ``"image": PATH`` or ``"video": PATH`` (an MP4/WebM/… file decoded with PyAV, or a
folder of frames), paths relative to ``--media-root``; the human turn may mark the media's place with
``<image>``/``<video>`` (else the media comes first). Each sample is rendered by the processor's chat
template (content items of type image/video/text); labels cover only the answers (and the end-of-turn
token; an end-of-sequence token is appended where the template writes none).

Targets are discovered, not listed: every ``nn.Linear`` of the language model's decoder blocks
(attention and MLP; MoE routers excluded) gets a KeepLoRA++ adapter with layer scaling over the
language model's depth; the vision tower stays frozen (``train_vision``: adapted as a second tower
with its own layer scaling); the projector (``multi_modal_projector``, Qwen's ``merger``, …) trains
plainly. Evaluation: exact match (after :func:`~kplora_kernels.llava.normalize`) of greedy answers for
every task after every task; ``results.json`` holds ``tasks``, the accuracy matrix and Last/Avg/BWT;
a rerun with the same ``--output`` resumes after the last finished task; ``--export`` writes the
merged model and the processor as a ``save_pretrained`` folder.
"""
from __future__ import annotations

import bisect
import math
import os
import re
import time
from dataclasses import dataclass

import torch
from torch import nn

from .config_file import ConfigError, load_settings, read_mapping, require_packages, result_settings, setting
from .continual import METHODS, KeepLoRA, KeepLoRAConfig
from .continual.runs import ResumableRun
from .distributed import barrier, data_parallel, init_from_env, is_distributed, is_rank0, rank_shard
from .llava import DTYPES, normalize, read_tasks
from .training import (SCHEDULES, Scalars, add_run_arguments, autocast, check_tensorboard, make_scheduler, progress,
                       seed_everything, train_steps)
from .training import log as logger

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# module names searched for each part of a VLM, outermost first (transformers' layouts)
LANGUAGE_NAMES = ("language_model", "text_model", "llm", "text_decoder", "decoder")
VISION_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder", "vision")
PROJECTOR_NAMES = ("multi_modal_projector", "merger", "mm_projector", "connector", "projector", "visual_projection",
                   "aligner", "mlp1")
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")  # MoE routing linears: not adapted


@dataclass
class VLMConfig:
    """Training settings (``--config`` keys). Defaults: the authors' LLaVA-1.5 settings (r = 32,
    α = r/4, ε_w = 0.6, lr 2e-4, cosine schedule with 3 % warmup), bf16; ``--preset video`` sets the
    authors' Video-LLaVA ones (:data:`PRESETS`) for every key the file leaves out."""

    method: str = setting("keeplora++", "the continual-learning method", choices=METHODS)
    rank: int = setting(32, "adapter rank r", ge=1)
    alpha: float = setting(8.0, "adapter scale α (the update is α/r·s·BA)", gt=0)
    eps_w: float = setting(0.6, "ε_w of the language model's principal subspaces", gt=0, le=1)
    eps_w_vision: float = setting(0.6, "ε_w of the vision tower's principal subspaces (train_vision)", gt=0, le=1)
    eps_f: float = setting(0.99, "ε_f of the task-feature (GPM) expansion", gt=0, le=1)
    train_vision: bool = setting(False, "adapt the vision tower's blocks too (a second tower, its own layer scaling)")
    lr: float = setting(2e-4, "peak learning rate (AdamW)", gt=0)
    lr_schedule: str = setting("cosine", "per-step schedule within a task (the authors: cosine)", choices=SCHEDULES)
    warmup_fraction: float = setting(0.03, "share of a task's steps spent warming up", ge=0, lt=1)
    batch_size: int = setting(4, "conversations per batch (per rank under torchrun)", ge=1)
    gradient_accumulation: int = setting(1, "batches averaged per optimizer step", ge=1)
    epochs: int = setting(1, "passes over each task's training set", ge=1)
    amp: bool = setting(True, "bf16 autocast for training and evaluation on CUDA (no effect on the CPU)")
    gradient_batches: int = setting(16, "batches for the task-start gradient (unless gradient_fraction)", ge=1)
    gradient_fraction: float | None = setting(None, "share of a task's batches for the task-start gradient "
                                                    "(null: gradient_batches)", gt=0, le=1)
    subspace_batches: int = setting(16, "batches for the task-end input subspace", ge=1)
    video_frames: int = setting(8, "frames sampled uniformly from each video in training and evaluation", ge=1)
    video_fps: float | None = setting(None, "sample videos at this many frames per second instead (at most "
                                            "video_frames; null: video_frames spread over the whole video)", gt=0)
    boundary_video_frames: int | None = setting(None, "frames per video in the task-start and task-end passes "
                                                      "(null: video_frames)", ge=1)
    max_new_tokens: int = setting(16, "longest generated answer in evaluation", ge=1)
    max_eval_samples: int | None = setting(None, "test conversations per task (null: all)", ge=1)
    dtype: str = setting("bf16", "dtype the model is loaded in", choices=tuple(DTYPES))
    gradient_checkpointing: bool = setting(True, "recompute activations in the backward (less memory)",
                                           affects_results=False)
    seed: int = setting(0, "seed of shuffling and the controller", ge=0)


# the authors' settings per setup: Video-LLaVA on CL-VISTA (r 64, α 128, ε_w 0.6, the task-start gradient
# from a 10 % subset with 4 frames per video instead of 8)
PRESETS = {
    "llava": {},
    "video": {"rank": 64, "alpha": 128.0, "eps_w": 0.6, "gradient_fraction": 0.1, "video_frames": 8,
              "boundary_video_frames": 4},
}


def load_config(args) -> VLMConfig:
    """The settings (the file's keys over ``--preset``'s), checked before any data or model is loaded."""
    name = getattr(args, "preset", None) or "llava"
    if name not in PRESETS:
        raise ConfigError(f"--preset must be one of {sorted(PRESETS)}, got {name!r}")
    given = read_mapping(args.config) if args.config is not None else {}
    overrides = {k: v for k, v in PRESETS[name].items() if k not in given}
    for key in ("video_frames", "video_fps", "boundary_video_frames"):  # the command line over the file
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if getattr(args, "train_vision", False):
        overrides["train_vision"] = True
    return load_settings(VLMConfig, args.config, **overrides)


# --- media --------------------------------------------------------------------------------------------

def _frame_indices(total: int, frames: int, fps: float | None, rate: float | None) -> list[int]:
    """``frames`` indices spread evenly over ``total`` frames (with ``fps`` and a known ``rate``: one
    every ``rate/fps`` frames, at most ``frames``)."""
    count = frames
    if fps is not None and rate:
        count = max(1, min(frames, round(total / rate * fps)))
    count = min(count, total)
    if count == 1:
        return [total // 2]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def read_video(path: str, frames: int, fps: float | None = None):
    """Decode the video file or frame folder at ``path``: ``(array (T, H, W, 3) uint8, metadata dict)``
    with ``T ≤ frames`` frames sampled evenly (see :func:`_frame_indices`). Raises ``ConfigError``
    when the path is missing, holds no frame, or PyAV (package ``av``) is not installed."""
    import numpy as np

    if os.path.isdir(path):
        from PIL import Image

        files = sorted(f for f in os.listdir(path) if f.lower().endswith(FRAME_EXTENSIONS))
        if not files:
            raise ConfigError(f"video frame folder {path} holds no image ({', '.join(FRAME_EXTENSIONS)})")
        indices = _frame_indices(len(files), frames, None, None)
        video = np.stack([np.asarray(Image.open(os.path.join(path, files[i])).convert("RGB")) for i in indices])
        return video, {"total_num_frames": len(files), "frames_indices": indices}
    if not os.path.isfile(path):
        raise ConfigError(f"video not found: {path}")
    try:
        import av
    except ImportError:
        raise ConfigError("kplora vlm needs PyAV to decode videos: pip install av "
                          "(or pip install 'kplora_kernels[hf]')") from None
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.error.FFmpegError, IndexError) as exc:
        raise ConfigError(f"cannot decode the video {path}: {exc}") from None
    if not decoded:
        raise ConfigError(f"the video {path} holds no frame")
    indices = _frame_indices(len(decoded), frames, fps, rate)
    meta = {"total_num_frames": len(decoded), "fps": rate, "frames_indices": indices,
            "duration": len(decoded) / rate if rate else None}
    return np.stack([decoded[i] for i in indices]), meta


# --- conversations ------------------------------------------------------------------------------------

class ChatData:
    """Encodes LLaVA-style conversations through ``processor`` (its chat template, tokenizer, image and
    video processors). ``frames``/``fps``: video sampling (:func:`read_video`)."""

    def __init__(self, processor, media_root: str, frames: int, fps: float | None):
        self.processor, self.media_root, self.frames, self.fps = processor, media_root, frames, fps
        self.tokenizer = getattr(processor, "tokenizer", None)
        if self.tokenizer is None or not getattr(processor, "chat_template", None):
            raise ConfigError("the model folder's processor has no chat template (chat_template.jinja or "
                              "processor_config.json's chat_template): kplora vlm renders every sample with it")
        self.eos = self.tokenizer.eos_token

    def _media(self, sample: dict) -> tuple[str, str]:
        kinds = [k for k in ("image", "video") if k in sample]
        if len(kinds) != 1 or not isinstance(sample[kinds[0]], str):
            raise ConfigError(f"sample {sample.get('id', '?')!r} must have exactly one of \"image\": PATH or "
                              f"\"video\": PATH, got keys {sorted(sample)}")
        return kinds[0], os.path.join(self.media_root, sample[kinds[0]])

    def messages(self, sample: dict) -> list[dict]:
        """Chat messages with content items; the media item at its ``<image>``/``<video>`` marker of
        the first human turn (first when unmarked)."""
        kind, _ = self._media(sample)
        turns = sample.get("conversations")
        if not isinstance(turns, list) or len(turns) < 2:
            raise ConfigError(f"sample {sample.get('id', '?')!r} needs \"conversations\": [human, gpt, …]")
        out = []
        for i, turn in enumerate(turns):
            text = str(turn.get("value", ""))
            role = "user" if i % 2 == 0 else "assistant"
            if i == 0:
                parts = re.split(r"<(?:image|video)>", text)
                if len(parts) > 2:
                    raise ConfigError(f"sample {sample.get('id', '?')!r}: one <image>/<video> marker per "
                                      f"conversation, got {len(parts) - 1}")
                before, after = (parts if len(parts) == 2 else ("", parts[0]))
                content = [{"type": "text", "text": t.strip()} for t in (before,) if t.strip()]
                content += [{"type": kind}] + [{"type": "text", "text": after.strip()}]
            else:
                if re.search(r"<(?:image|video)>", text):
                    raise ConfigError(f"sample {sample.get('id', '?')!r}: the media marker must be in the first "
                                      "human turn")
                content = [{"type": "text", "text": text.strip()}]
            out.append({"role": role, "content": content})
        return out

    def _render(self, messages, prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    def text(self, sample: dict) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its answers (each answer with its
        end-of-turn marker; the tokenizer's EOS appended where the template writes none)."""
        msgs = self.messages(sample)
        full = self._render(msgs, False)
        spans = []
        for i in range(1, len(msgs), 2):
            start, end = len(self._render(msgs[:i], True)), len(self._render(msgs[:i + 1], False))
            if not full.startswith(self._render(msgs[:i + 1], False)) or start > end:
                raise ConfigError("the chat template does not render a conversation as the prefix of its "
                                  "continuation; kplora vlm cannot tell the answers apart from the prompt")
            spans.append((start, end))
        if self.eos:
            for k in range(len(spans) - 1, -1, -1):  # last first: earlier offsets stay valid
                start, end = spans[k]
                if self.eos not in full[start:end]:
                    full = full[:end] + self.eos + full[end:]
                    spans = spans[:k] + [(start, end + len(self.eos))] + [(s + len(self.eos), e + len(self.eos))
                                                                          for s, e in spans[k + 1:]]
        return full, spans

    def load(self, sample: dict, frames: int):
        kind, path = self._media(sample)
        if kind == "image":
            from PIL import Image

            if not os.path.isfile(path):
                raise ConfigError(f"image not found: {path}")
            return kind, Image.open(path).convert("RGB"), None
        video, meta = read_video(path, frames, self.fps)
        return kind, video, meta

    def _process(self, texts, media):
        images = [m for k, m, _ in media if k == "image"]
        videos = [m for k, m, _ in media if k == "video"]
        kwargs = {}
        if videos:
            kwargs = {"videos": videos, "do_sample_frames": False,
                      "video_metadata": [meta for k, _, meta in media if k == "video"]}
        return self.processor(text=texts, images=images or None, return_tensors="pt", padding=True,
                              add_special_tokens=False, **kwargs)

    def batch(self, samples: list[dict], frames: int | None = None) -> dict:
        """Processor outputs for ``samples`` (padded) with ``labels``: the answers' tokens, −100 elsewhere."""
        frames = frames or self.frames
        rendered = [self.text(s) for s in samples]
        out = dict(self._process([t for t, _ in rendered], [self.load(s, frames) for s in samples]))
        ids, mask = out["input_ids"], out["attention_mask"]
        labels = torch.full_like(ids, -100)
        for row, (text, spans) in enumerate(rendered):
            plain = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            positions = mask[row].nonzero().flatten()
            shift = len(positions) - len(plain.input_ids)  # the media placeholders' expansion, all before the answers
            starts = [s for s, _ in spans]
            for i, (a, _) in enumerate(plain.offset_mapping):
                k = bisect.bisect_right(starts, a) - 1
                if k >= 0 and a < spans[k][1]:
                    p = positions[i + shift]
                    if ids[row, p] != plain.input_ids[i]:
                        raise ConfigError("cannot align the answer tokens with the processor's output (media "
                                          "tokens after an answer?)")
                    labels[row, p] = ids[row, p]
        out["labels"] = labels
        return out

    def question(self, sample: dict):
        """``(processor inputs of the first question with the generation prompt, reference answer)``."""
        msgs = self.messages(sample)
        inputs = self._process([self._render(msgs[:1], True)], [self.load(sample, self.frames)])
        return dict(inputs), sample["conversations"][1]["value"]


class Batches:
    """A task's batches, encoded when read (nothing held): ``len``, iteration and slicing (a prefix),
    as :meth:`KeepLoRA.begin_task` and :meth:`~KeepLoRA.end_task` take them."""

    def __init__(self, data: ChatData, groups: list[list[dict]], frames: int | None = None):
        self.data, self.groups, self.frames = data, groups, frames

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Batches(self.data, self.groups[index], self.frames)
        return self.data.batch(self.groups[index], self.frames)

    def __iter__(self):
        return (self.data.batch(g, self.frames) for g in self.groups)


# --- targets ------------------------------------------------------------------------------------------

def _find_named(root: nn.Module, names, skip=()) -> list[tuple[str, nn.Module]]:
    """Outermost submodules whose last name component is in ``names`` (in ``names``' order of preference)."""
    found = []
    for name, module in root.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in names and not any(name.startswith(f + ".") or name == f for f, _ in found) \
                and not any(name.startswith(s + ".") or name == s for s in skip):
            found.append((name, module))
    return sorted(found, key=lambda nm: names.index(nm[0].rpartition(".")[2]))


def _blocks(root_name: str, root: nn.Module):
    """``(path, ModuleList)`` of the outermost list of repeated blocks holding linears under ``root``."""
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and \
                all(any(isinstance(m, nn.Linear) for m in block.modules()) for block in module):
            return ".".join(p for p in (root_name, name) if p), module
    return None


def _block_linears(path: str, blocks: nn.ModuleList, exclude=()) -> dict[str, int]:
    """``{module path: block index}`` of every ``nn.Linear`` inside ``blocks`` (leaf names in ``exclude`` left out)."""
    out = {}
    for i, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and name.rpartition(".")[2] not in exclude:
                out[f"{path}.{i}.{name}"] = i
    return out


def discover_targets(model: nn.Module, train_vision: bool = False) -> dict:
    """What KeepLoRA++ adapts in a vision-language ``model``: ``{"language": path, "vision": path or None,
    "projector": [paths], "layer_index": {linear path: block index}, "targets": [regex]}``.

    The language model is the outermost submodule named one of :data:`LANGUAGE_NAMES`; its blocks are
    the outermost ``nn.ModuleList`` of blocks holding linears; every linear in them is a target except
    MoE routers (:data:`ROUTER_NAMES`). With ``train_vision`` the vision tower's blocks (a submodule
    named one of :data:`VISION_NAMES`) are targets too. Raises ``ConfigError`` naming what was
    searched when no language-model blocks are found (or, with ``train_vision``, no vision blocks)."""
    languages = _find_named(model, LANGUAGE_NAMES)
    found = None
    for name, module in languages:
        found = _blocks(name, module)
        if found:
            break
    if found is None:
        raise ConfigError(f"cannot find the language model's decoder layers in {type(model).__name__}: searched "
                          f"submodules named {', '.join(LANGUAGE_NAMES)} (found {[n for n, _ in languages] or 'none'}) "
                          "for an nn.ModuleList of blocks holding nn.Linear layers")
    language, blocks = found
    index = _block_linears(language, blocks, ROUTER_NAMES)
    visions = _find_named(model, VISION_NAMES, skip=[n for n, _ in languages])
    vision = visions[0][0] if visions else None
    if train_vision:
        vblocks = _blocks(*visions[0]) if visions else None
        if vblocks is None:
            raise ConfigError(f"train_vision: cannot find the vision tower's blocks in {type(model).__name__}: "
                              f"searched submodules named {', '.join(VISION_NAMES)} "
                              f"(found {[n for n, _ in visions] or 'none'})")
        index.update(_block_linears(*vblocks))
    projector = [n for n, _ in _find_named(model, PROJECTOR_NAMES, skip=[language])]
    return {"language": language, "vision": vision, "projector": projector, "layer_index": index,
            "targets": ["^(" + "|".join(re.escape(n) for n in index) + ")$"]}


def controller_config(found: dict, cfg: VLMConfig) -> KeepLoRAConfig:
    """The controller's configuration for the discovered targets and the settings."""
    towers = ["default"] + (["visual"] if cfg.train_vision else [])
    return KeepLoRAConfig(method=cfg.method, rank=cfg.rank, alpha=cfg.alpha, eps_f=cfg.eps_f, seed=cfg.seed,
                          eps_w={"default": cfg.eps_w, "visual": cfg.eps_w_vision}, targets=found["targets"],
                          layer_scaling_towers=towers,
                          extra_trainable=[f"^{re.escape(p)}\\." for p in found["projector"]])


# --- the run ------------------------------------------------------------------------------------------

def _to(batch: dict, device, dtype) -> dict:
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def _load(folder: str, dtype, device):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).to(device)
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as exc:  # not a VLM folder, an unknown model type
        raise ConfigError(f"cannot load a vision-language model and its processor from {folder}: {exc}") from None
    return model, processor


def run(args, cfg: VLMConfig, log=None, command: str = "vlm") -> dict:
    log = log or logger.info
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
    device = init_from_env(args.device)
    seed_everything(cfg.seed)
    start = time.perf_counter()
    log(f"loading {args.model} ({cfg.dtype}) on {device}")
    model, processor = _load(args.model, DTYPES[cfg.dtype], device)
    data = ChatData(processor, args.media_root, cfg.video_frames, cfg.video_fps)
    found = discover_targets(model, cfg.train_vision)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    names = [t["name"] for t in tasks]
    run_state = ResumableRun(args.output, {"tasks": names, "model": os.path.realpath(args.model),
                                           "config": result_settings(cfg)})
    previous = run_state.previous()
    if previous:
        kl = KeepLoRA.from_checkpoint(model, run_state.checkpoint)
        rows, step = previous["rows"], previous.get("global_step", 0)
        if len(rows) == len(tasks):
            log(f"already complete: {args.output} holds all {len(rows)} tasks; writing the results again")
            _export(kl, export, processor, log)
            return _finish(run_state, names, rows, log)
        log(f"resuming after task {len(rows)} ({names[len(rows) - 1]})")
    else:
        rows, step = [], 0
        log(f"wrapping {type(model).__name__}: adapters on {found['language']} "
            f"({len(found['layer_index'])} linears), projector {found['projector'] or 'none found'} trained plainly, "
            f"vision tower {found['vision']} {'adapted' if cfg.train_vision else 'frozen'}")
        kl = KeepLoRA(model, controller_config(found, cfg), layer_index=found["layer_index"],
                      bases_cache_dir=getattr(args, "bases_cache", None))
    log(f"ready in {time.perf_counter() - start:.0f} s: {len(kl.layers)} adapted linears, "
        f"{sum(p.numel() for p in kl.trainable_parameters())} trainable parameters")
    # the blocks of the language model are FSDP2's units
    trained = data_parallel(model, args.strategy, device, re.compile(re.escape(found["language"]) + r"\.\d+"))

    def loss_fn(m, batch):
        """``loss(model, batch)``: the language-modelling loss on the answers of a processed batch."""
        return m(**_to(batch, device, model.dtype)).loss

    boundary = cfg.boundary_video_frames or cfg.video_frames
    scalars = Scalars(args.log_dir)
    try:
        for t in range(len(rows), len(tasks)):
            torch.manual_seed(cfg.seed + t)
            samples = rank_shard(tasks[t]["train"])
            order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(cfg.seed + t)).tolist()
            groups = [[samples[i] for i in order[k:k + cfg.batch_size]] for k in range(0, len(order), cfg.batch_size)]
            if not groups:
                raise ConfigError(f"task {names[t]!r} has no training conversation for this rank")
            batches, passes = Batches(data, groups), Batches(data, groups, boundary)
            first = math.ceil(cfg.gradient_fraction * len(groups)) if cfg.gradient_fraction else cfg.gradient_batches
            model.train()
            kl.begin_task(passes[:first], loss_fn)
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
            kl.end_task(passes[: cfg.subspace_batches], loss_fn)
            rows.append([evaluate(model, data, task, cfg, device) for task in tasks])
            scalars.accuracy_row(names, rows[-1], t)
            run_state.record(kl, rows, global_step=step)
            log(f"task {t} ({names[t]}): final running loss {trained_task['loss']:.4f}; exact match " +
                ", ".join(f"{n} {a:.3f}" for n, a in zip(names, rows[-1])))
        _export(kl, export, processor, log)
        return _finish(run_state, names, rows, log)
    finally:
        scalars.close()


def _export(kl: KeepLoRA, folder: str | None, processor, log) -> None:
    """``--export``: the plain model after the last task (:meth:`KeepLoRA.merge_and_unload`) and its
    processor as a ``save_pretrained`` folder that ``AutoModelForImageTextToText.from_pretrained`` and
    ``AutoProcessor.from_pretrained`` load without this package. Rank 0 writes."""
    if folder is None:
        return
    model = kl.merge_and_unload()
    if is_rank0():
        os.makedirs(folder, exist_ok=True)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        log(f"exported the merged model to {folder} (save_pretrained)")
    barrier()


def _finish(run_state, names, rows, log) -> dict:
    result = run_state.finish(names, rows, "VLM continual instruction tuning")
    log(f"Transfer {100 * result['transfer']:.1f}  Average {100 * result['average']:.1f}  "
        f"Last {100 * result['last']:.1f}  BWT {100 * result['bwt']:+.1f}")
    return result


@torch.no_grad()
def evaluate(model, data: ChatData, task: dict, cfg: VLMConfig, device) -> float:
    """Exact match of greedy answers to the first question of each test conversation (case,
    surrounding space and a final period ignored)."""
    model.eval()
    samples = task["test"][: cfg.max_eval_samples] if cfg.max_eval_samples else task["test"]
    tokenizer = data.tokenizer
    correct = 0
    bar = progress(samples, total=len(samples), desc=f"evaluating {task['name']}")
    for seen, sample in enumerate(bar, 1):
        inputs, answer = data.question(sample)
        inputs = _to(inputs, device, model.dtype)
        with autocast(device, cfg.amp):
            out = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                 else tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += normalize(text) == normalize(answer)
        bar.set_postfix(exact_match=f"{correct / seen:.3f}", refresh=False)
    return correct / max(len(samples), 1)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="a vision-language model folder (save_pretrained layout, with its processor)")
    parser.add_argument("--data", required=True, help="the task list: JSON [{name, train, test}, …]")
    parser.add_argument("--media-root", required=True, help="folder the conversations' image and video paths start from")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llava",
                        help="defaults for the settings the --config file leaves out: llava (the authors' "
                             "LLaVA-1.5 settings) or video (Video-LLaVA: r 64, α 128, 10%% of the batches for the "
                             "task-start gradient, 4 frames per video in the boundary passes)")
    add_run_arguments(parser, VLMConfig, output="vlm_output",
                      device_help="cuda or cpu (default: cuda:LOCAL_RANK when available)")
    parser.add_argument("--video-frames", type=int, help="frames sampled from each video (the video_frames setting)")
    parser.add_argument("--video-fps", type=float, help="sample videos at this rate, at most --video-frames (video_fps)")
    parser.add_argument("--boundary-video-frames", type=int,
                        help="frames per video in the task-start and task-end passes (boundary_video_frames)")
    parser.add_argument("--train-vision", action="store_true",
                        help="adapt the vision tower's blocks too (train_vision): a second tower with its own layer scaling")
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp",
                        help="under torchrun: DDP, or FSDP2 (fully_shard per language-model block)")
    parser.add_argument("--export", metavar="DIR",
                        help="after the last task, write the merged plain model and its processor "
                             "(save_pretrained) to DIR; loads without this package")


def main(args) -> dict:
    return run(args, load_config(args))
