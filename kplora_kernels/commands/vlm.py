"""``kplora vlm``: continual instruction tuning of any transformers vision-language model, images and video.

The model is loaded with ``AutoModelForImageTextToText`` and its ``AutoProcessor`` (tokenizer, image
and video processors, chat template), so every family gets its own special tokens, pixel layout and
positions (Qwen2-VL's M-RoPE grids, LLaVA-NeXT's tiles, video frames). The task list is ``kplora
llava``'s (:mod:`~kplora_kernels.commands.chat`); samples carry an image or a video
(:mod:`~kplora_kernels.commands.vlm_data`), paths relative to ``--media-root``.

Targets are discovered, not listed (:func:`~kplora_kernels.commands.targets.discover_targets`): every
``nn.Linear`` of the language model's decoder blocks (attention and MLP; MoE routers excluded) gets a
KeepLoRA++ adapter with layer scaling over the language model's depth; the vision tower stays frozen
(``train_vision``: adapted as a second tower with its own layer scaling); the projector
(``multi_modal_projector``, Qwen's ``merger``, …) trains plainly. Evaluation: exact match of greedy
answers for every task after every task; ``results.json`` holds ``tasks``, the accuracy matrix and
Last/Avg/BWT; a rerun with the same ``--output`` resumes after the last finished task; ``--export``
writes the merged model and the processor as a ``save_pretrained`` folder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..config_file import ConfigError, load_settings, read_mapping, setting
from ..continual import KeepLoRA, KeepLoRAConfig
from ..training import log as logger
from . import chat
from .common import add_run_arguments
from .targets import discover_targets
from .vlm_data import ChatData


@dataclass
class VLMConfig(chat.ChatSettings):
    """Training settings (``--config`` keys). Defaults: the authors' LLaVA-1.5 settings (r = 32,
    α = r/4, ε_w = 0.6, lr 2e-4, cosine schedule with 3 % warmup), bf16; ``--preset video`` sets the
    authors' Video-LLaVA ones (:data:`PRESETS`) for every key the file leaves out."""

    eps_w_vision: float = KeepLoRAConfig.setting("eps_w", 0.6, "ε_w of the vision tower's principal subspaces "
                                                                "(train_vision)")
    train_vision: bool = setting(False, "adapt the vision tower's blocks too (a second tower, its own layer scaling)")
    gradient_batches: int = setting(16, "batches for the task-start gradient (unless gradient_fraction)", ge=1)
    gradient_fraction: float | None = setting(None, "share of a task's batches for the task-start gradient "
                                                    "(null: gradient_batches)", gt=0, le=1)
    video_frames: int = setting(8, "frames sampled uniformly from each video in training and evaluation", ge=1)
    video_fps: float | None = setting(None, "sample videos at this many frames per second instead (at most "
                                            "video_frames; null: video_frames spread over the whole video)", gt=0)
    boundary_video_frames: int | None = setting(None, "frames per video in the task-start and task-end passes "
                                                      "(null: video_frames)", ge=1)


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


def controller_config(found: dict, cfg: VLMConfig) -> KeepLoRAConfig:
    """The controller's configuration for the discovered targets and the settings."""
    towers = ["default"] + (["visual"] if cfg.train_vision else [])
    return KeepLoRAConfig(method=cfg.method, rank=cfg.rank, alpha=cfg.alpha, eps_f=cfg.eps_f, seed=cfg.seed,
                          eps_w={"default": cfg.eps_w, "visual": cfg.eps_w_vision}, targets=found["targets"],
                          layer_scaling_towers=towers,
                          extra_trainable=[f"^{re.escape(p)}\\." for p in found["projector"]])


def _load(folder: str, dtype, device):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).to(device)
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as exc:  # not a VLM folder, an unknown model type
        raise ConfigError(f"cannot load a vision-language model and its processor from {folder}: {exc}") from None
    return model, processor


def run(args, cfg: VLMConfig, log=None, command: str = "vlm") -> dict:
    """The whole command (``command``: the name its messages use); returns ``results.json``'s content."""
    log = log or logger.info
    tasks = chat.check_inputs(args, command)
    device, started = chat.start(args, cfg, log)
    model, processor = _load(args.model, chat.DTYPES[cfg.dtype], device)
    data = ChatData(processor, args.media_root, cfg.video_frames, cfg.video_fps)
    found = discover_targets(model, cfg.train_vision)

    def wrap() -> KeepLoRA:
        log(f"wrapping {type(model).__name__}: adapters on {found['language']} "
            f"({len(found['layer_index'])} linears), projector {found['projector'] or 'none found'} trained plainly, "
            f"vision tower {found['vision']} {'adapted' if cfg.train_vision else 'frozen'}")
        return KeepLoRA(model, controller_config(found, cfg), layer_index=found["layer_index"],
                        bases_cache_dir=getattr(args, "bases_cache", None))
    # the blocks of the language model are FSDP2's units
    family = chat.Chat(model, data, wrap, re.compile(re.escape(found["language"]) + r"\.\d+"), (processor,),
                       "VLM continual instruction tuning")
    return chat.run(args, cfg, family, tasks, device, started, log)


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
    chat.add_engine_arguments(parser, "language-model block", "save_pretrained, with its processor")


def main(args) -> dict:
    return run(args, load_config(args))
