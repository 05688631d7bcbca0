"""``kplora llava``: continual instruction tuning of a transformers ``LlavaForConditionalGeneration``.

The task list and its conversations are :mod:`~kplora_kernels.commands.chat`'s; image paths are
relative to ``--image-root``. Trains with the controller (``preset("llava")``: q, k, v, o, gate, up,
down of every language-model layer; the projector trained plainly), in bf16 with gradient
checkpointing by default, evaluates every task after every task by exact match of greedy answers,
and resumes after the last finished task like ``kplora mtil``. Under ``torchrun`` each rank trains
on its shard through DDP or FSDP2 (``--strategy``) and the controller keeps the state identical on
all ranks. A folder of another family, or one whose processor has a chat template, runs as
``kplora vlm`` with these settings.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from ..config_file import ConfigError, load_settings
from ..continual import KeepLoRA, preset
from ..training import log as logger
from . import chat
from .common import add_run_arguments, read_json


@dataclass
class LLaVAConfig(chat.ChatSettings):
    """Training settings (``--config`` keys). Defaults: the authors' LLaVA-1.5-7B settings (r = 32,
    α = r/4, ε_w = 0.6, lr 2e-4, cosine schedule with 3 % warmup), bf16."""


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

    def _bos(self) -> list[int]:
        return [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []

    def image(self, path: str) -> torch.Tensor:
        from PIL import Image

        full = os.path.join(self.image_root, path)
        if not os.path.isfile(full):
            raise ConfigError(f"image not found: {full}")
        return self.image_processor(Image.open(full).convert("RGB"), return_tensors="pt").pixel_values[0]

    def training_example(self, sample: dict):
        """``(input ids, labels, pixel values)`` of one conversation, every turn."""
        ids = self._bos()
        labels = [-100] * len(ids)
        turns = sample["conversations"]
        for human, gpt in zip(turns[0::2], turns[1::2]):
            prompt = self._ids(f"USER: {human['value']} ASSISTANT:")
            answer = self._ids(" " + gpt["value"]) + [self.tokenizer.eos_token_id]
            ids += prompt + answer
            labels += [-100] * len(prompt) + answer
        return torch.tensor(ids), torch.tensor(labels), self.image(sample["image"])

    def question(self, sample: dict):
        """``(generate inputs of the first question, reference answer)``."""
        human, gpt = sample["conversations"][0], sample["conversations"][1]
        ids = torch.tensor(self._bos() + self._ids(f"USER: {human['value']} ASSISTANT:")).unsqueeze(0)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": self.image(sample["image"]).unsqueeze(0)}, gpt["value"]

    def batch(self, samples: list[dict], frames=None) -> dict:
        """The conversations ``samples`` encoded and right-padded into one batch (``frames``: unused)."""
        examples = [self.training_example(s) for s in samples]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        length = max(len(ids) for ids, _, _ in examples)
        input_ids = torch.full((len(examples), length), pad)
        labels = torch.full((len(examples), length), -100)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, (ids, lab, _) in enumerate(examples):
            input_ids[row, :len(ids)], labels[row, :len(ids)], mask[row, :len(ids)] = ids, lab, 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
                "pixel_values": torch.stack([img for _, _, img in examples])}


def run(args, cfg: LLaVAConfig, log=None) -> dict:
    log = log or logger.info
    tasks = chat.check_inputs(args, "llava")
    if _needs_vlm(args.model):
        return _as_vlm(args, cfg, log)
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    device, started = chat.start(args, cfg, log)
    try:
        model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=chat.DTYPES[cfg.dtype]).to(device)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        image_processor = AutoImageProcessor.from_pretrained(args.model)
    except OSError as exc:
        raise ConfigError(f"cannot load the model from {args.model}: {exc}") from None

    def wrap() -> KeepLoRA:
        log(f"wrapping the model ({cfg.method}: principal subspaces of every adapted weight)")
        return KeepLoRA(model, preset("llava", method=cfg.method, rank=cfg.rank, alpha=cfg.alpha, eps_f=cfg.eps_f,
                                      eps_w={"default": cfg.eps_w}, seed=cfg.seed),
                        bases_cache_dir=getattr(args, "bases_cache", None))
    # the blocks of the language model are FSDP2's units
    family = chat.Chat(model, Conversations(model, tokenizer, image_processor, args.image_root), wrap,
                       re.compile(r".*language_model\.layers\.\d+"), (tokenizer, image_processor),
                       "LLaVA continual instruction tuning")
    return chat.run(args, cfg, family, tasks, device, started, log)


def _needs_vlm(folder: str) -> bool:
    """A folder this command's own USER/ASSISTANT encoding does not serve: another family than LLaVA
    (Qwen2-VL, LLaVA-NeXT, …) or one whose processor carries a chat template (``kplora vlm`` renders
    every sample with it)."""
    config = os.path.join(folder, "config.json")
    model_type = read_json(config).get("model_type") if os.path.isfile(config) else None
    if model_type not in (None, "llava") or os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        return True
    processor = os.path.join(folder, "processor_config.json")
    return os.path.isfile(processor) and bool(read_json(processor).get("chat_template"))


def _as_vlm(args, cfg: LLaVAConfig, log) -> dict:
    """``kplora llava`` on a folder for :mod:`kplora_kernels.commands.vlm`: the same run with these
    settings (LLaVA's defaults) and ``--image-root`` as the media root."""
    import dataclasses

    from . import vlm

    known = {f.name for f in dataclasses.fields(vlm.VLMConfig)}
    settings = vlm.VLMConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in known})
    args.media_root = args.image_root
    log(f"{args.model} has a chat template or is not a LLaVA-1.5 model: running it as kplora vlm")
    return vlm.run(args, settings, log, command="llava")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="a LLaVA model folder (save_pretrained layout)")
    parser.add_argument("--data", required=True, help="the task list: JSON [{name, train, test}, …]")
    parser.add_argument("--image-root", required=True, help="folder the conversations' image paths start from")
    add_run_arguments(parser, LLaVAConfig, output="llava_output",
                      device_help="cuda or cpu (default: cuda:LOCAL_RANK when available)")
    chat.add_engine_arguments(parser, "language-model layer", "save_pretrained, with the tokenizer and image processor")


def load_config(args) -> LLaVAConfig:
    """The settings, checked before any data or model is loaded."""
    return load_settings(LLaVAConfig, args.config)


def main(args) -> dict:
    return run(args, load_config(args))
