"""``kplora memory``: the KeepLoRA++ state and the peaks of a run for a model config, as a table or
JSON (the arithmetic is :mod:`~kplora_kernels.commands.memory_plan`'s). The model is built from its
config on the meta device (no weights, no memory), so every linear's shape is the model's own.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..config_file import ConfigError, check_settings, setting
from .memory_plan import DTYPE_BYTES, linear_shapes, plan

# Built-in configs: transformers config.json contents of the released models (the shapes only; the model
# is built from them on the meta device, so every count below is read from its real modules).
_CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
               "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
               "projection_dim": 768}
_VICUNA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}
PRESETS = {
    "llava-1.5-7b": {"model_type": "llava", "text_config": _VICUNA_7B, "vision_config": _CLIP_L_336,
                     "image_token_index": 32000, "vision_feature_layer": -2},
    "llava-1.5-13b": {"model_type": "llava", "vision_config": _CLIP_L_336, "image_token_index": 32000,
                      "vision_feature_layer": -2,
                      "text_config": {**_VICUNA_7B, "hidden_size": 5120, "intermediate_size": 13824,
                                      "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40}},
    "llava-next-video-7b": {"model_type": "llava_next_video", "vision_config": _CLIP_L_336,
                            "text_config": {**_VICUNA_7B, "vocab_size": 32064}, "image_token_index": 32001,
                            "video_token_index": 32000, "vision_feature_layer": -2},
    "qwen2.5-vl-7b": {"model_type": "qwen2_5_vl", "tie_word_embeddings": False,
                      "text_config": {"model_type": "qwen2_5_vl_text", "hidden_size": 3584, "intermediate_size": 18944,
                                      "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                                      "vocab_size": 152064,
                                      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
                      "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                                        "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                                        "temporal_patch_size": 2, "window_size": 112,
                                        "fullatt_block_indexes": [7, 15, 23, 31]}},
}


@dataclass
class MemoryArgs:
    """The command-line settings of ``kplora memory``."""

    rank: int = setting(32, "adapter rank r", ge=1)
    basis_fraction: float = setting(0.5, "k_in / in", ge=0, lt=1)
    seq_len: int = setting(2048, "tokens per sequence", ge=1)
    micro_batch: int = setting(1, "sequences per micro-batch", ge=1)
    tasks: int = setting(8, "tasks, for the checkpoint sizes", ge=1)
    resident_layers: int = setting(2, "adapted linears whose bases are on the device at once while a "
                                      "boundary finalises, with the 'cpu' placement (2: the current one and "
                                      "the prefetched next)", ge=1)


@dataclass
class ModelShape:
    """The keys of a transformers ``config.json`` that are checked before the model is built."""

    hidden_size: int = setting(4096, "hidden size of the language model", ge=1)
    intermediate_size: int = setting(11008, "width of the MLP's inner layer", ge=1)
    num_hidden_layers: int = setting(32, "decoder blocks of the language model", ge=1)
    num_attention_heads: int = setting(32, "query heads per attention", ge=1)
    num_key_value_heads: int = setting(32, "key/value heads per attention (grouped-query attention: fewer)",
                                       ge=1)
    vocab_size: int = setting(32000, "tokens in the vocabulary", ge=1)


def _leaf_names(paths: list[str]) -> list[str]:
    """Each path's last component, or the whole path where two share it."""
    leaves = [p.rpartition(".")[2] for p in paths]
    return [leaf if leaves.count(leaf) == 1 else path for leaf, path in zip(leaves, paths)]


def build_from_config(raw: dict, source: str) -> dict:
    """Build the model of a ``config.json`` mapping on the meta device (no memory, no weights) and read
    what the plan needs from its real modules: ``{"linears": [(name, out, in)] of one decoder block,
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size",
    "total_params", "vision_params", "model_type"}``. A VLM (a config with ``text_config`` and
    ``vision_config``) is built with ``AutoModelForImageTextToText`` and its language model's blocks are
    found as ``kplora vlm`` finds them; any other config with ``AutoModelForCausalLM`` (no
    ``model_type``: LLaMA). Raises ``ConfigError`` naming ``source`` when transformers cannot build it,
    when no decoder blocks are found, or when the blocks' linears differ."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from torch import nn

    from .targets import LANGUAGE_NAMES, ROUTER_NAMES, VISION_NAMES, find_blocks, find_named

    kind = raw.get("model_type") or "llama"
    try:
        config = AutoConfig.for_model(kind, **{k: v for k, v in raw.items() if k != "model_type"})
        vlm = getattr(config, "text_config", None) is not None and getattr(config, "vision_config", None) is not None
        with torch.device("meta"):
            model = (AutoModelForImageTextToText if vlm else AutoModelForCausalLM).from_config(config)
    except Exception as exc:  # transformers raises many kinds for a config it cannot build
        raise ConfigError(f"{source}: transformers cannot build a {kind!r} model from it: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    found = None
    for name, module in find_named(model, LANGUAGE_NAMES):
        found = found or find_blocks(name, module)
    if found is None and not vlm:
        found = find_blocks("", model)
    if found is None:
        raise ConfigError(f"{source}: cannot find the decoder blocks of {type(model).__name__} (searched submodules "
                          f"named {', '.join(LANGUAGE_NAMES)} for an nn.ModuleList of blocks holding nn.Linear layers)")
    path, blocks = found
    per_block = []
    for block in blocks:
        named = [(n, m) for n, m in block.named_modules()
                 if isinstance(m, nn.Linear) and n.rpartition(".")[2] not in ROUTER_NAMES]
        per_block.append([(leaf, m.out_features, m.in_features)
                          for leaf, (_, m) in zip(_leaf_names([n for n, _ in named]), named)])
    if any(b != per_block[0] for b in per_block):
        raise ConfigError(f"{source}: the decoder blocks of {type(model).__name__} hold different linears "
                          "(a hybrid or interleaved-MoE stack); kplora memory plans identical blocks only")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    visions = find_named(model, VISION_NAMES, skip=[path])
    widths = [i for _, _, i in per_block[0]] + [o for _, o, _ in per_block[0]]
    params = {id(p): p.numel() for p in model.parameters()}
    return {"model_type": kind, "linears": per_block[0], "num_hidden_layers": len(blocks),
            "hidden_size": getattr(text, "hidden_size", None) or min(widths),
            "intermediate_size": getattr(text, "intermediate_size", None) or max(widths),
            "num_attention_heads": getattr(text, "num_attention_heads", 1),
            "vocab_size": model.get_output_embeddings().out_features if model.get_output_embeddings() is not None
            else getattr(text, "vocab_size", 32000),
            "total_params": sum(params.values()),
            "vision_params": sum({id(p): p.numel() for _, v in visions for p in v.parameters()}.values()),
            "block_params": sum(p.numel() for p in blocks.parameters())}


def text_config(name_or_path: str) -> dict:
    """A built-in config name (:data:`PRESETS`) or a transformers ``config.json`` (LLaMA-style, any
    causal LM, or a VLM with ``text_config``), built on the meta device (:func:`build_from_config`):
    every linear's shape is read from the model itself (``head_dim``, GQA, biases as the family has
    them). A missing file, a missing key or a value of the wrong type or sign is a ``ConfigError``."""
    if name_or_path in PRESETS:
        return build_from_config(PRESETS[name_or_path], name_or_path)
    if not os.path.isfile(name_or_path):
        found = ("a folder, not a file" if os.path.isdir(name_or_path) else "no such file") \
            if os.path.sep in name_or_path or name_or_path.endswith(".json") else "not a preset name"
        raise ConfigError(f"--model-config must be one of {sorted(PRESETS)} or a config.json file, "
                          f"got {name_or_path!r} ({found})")
    try:
        with open(name_or_path) as f:
            raw = json.load(f)
    except ValueError as exc:
        raise ConfigError(f"cannot parse {name_or_path}: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("text_config", raw), dict):
        raise ConfigError(f"{name_or_path} must hold a mapping (a transformers config.json)")
    cfg = raw.get("text_config", raw)
    missing = [k for k in ("hidden_size", "num_hidden_layers") if k not in cfg]
    if missing:
        raise ConfigError(f"{name_or_path} lacks {missing} (a transformers config.json is expected)")
    check_settings(ModelShape, {k: v for k, v in cfg.items() if k in ModelShape.__dataclass_fields__}, name_or_path)
    heads, kv = cfg.get("num_attention_heads", 1), cfg.get("num_key_value_heads", cfg.get("num_attention_heads", 1))
    if heads % kv:
        raise ConfigError(f"{name_or_path}: num_attention_heads {heads} must be a multiple of num_key_value_heads {kv}")
    if "head_dim" not in cfg and cfg["hidden_size"] % heads:
        raise ConfigError(f"{name_or_path}: hidden_size {cfg['hidden_size']} must be a multiple of "
                          f"num_attention_heads {heads} when no head_dim is given")
    return build_from_config(raw, name_or_path)


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, name: str = "--device-memory", allow_zero: bool = False) -> int:
    """Bytes of a size such as ``24GiB``, ``80GB``, ``24000MiB`` or ``512B`` (units B, KB, MB, GB,
    TB — powers of 1000 — and KiB, MiB, GiB, TiB — powers of 1024; case-insensitive). Anything
    else, or a size that is not positive (``allow_zero``: negative), is a ``ConfigError`` naming ``name``."""
    import re

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*", str(text))
    if not match or match.group(2).upper() not in _SIZE_UNITS or (float(match.group(1)) <= 0 and not allow_zero):
        kind = "a size ≥ 0" if allow_zero else "a positive size"
        raise ConfigError(f"{name} must be {kind} with a unit such as 24GiB, 80GB or 24000MiB, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def format_report(r: dict) -> str:
    gib = lambda b: f"{b / 2**30:8.3f} GiB"  # noqa: E731
    mib = lambda b: f"{b / 2**20:9.2f}"  # noqa: E731
    c = r["config"]
    lines = [f"KeepLoRA++ state for hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, "
             f"{c['num_hidden_layers']} layers; r = {c['rank']}, k_in = {c['basis_fraction']:.2f}·in, "
             f"adapters {c['param_dtype']}, bases {c['basis_dtype']} (MiB per linear)",
             f"{'linear':<10}{'out×in':>13}{'adapter':>10}{'AdamW':>10}{'basis V':>10}{'grad sk.':>10}{'input sk.':>10}"]
    for name, s in r["per_linear"].items():
        lines.append(f"{name:<10}{'×'.join(map(str, s['shape'])):>13}{mib(s['adapter'])}{mib(s['optimizer'])}"
                     f"{mib(s['basis'])}{mib(s['gradient_sketch'])}{mib(s['input_sketch'])}")
    lines += [f"persistent (adapters, AdamW, bases), all layers: {gib(r['total_persistent'])}",
              f"peak transient (sketches, all layers at once):  {gib(r['peak_transient'])}",
              f"the authors' transient (fp32 full gradients):   {gib(r['authors_transient'])}"]
    return "\n".join(lines)


def format_plan(p: dict) -> str:
    gib = lambda b: f"{b / 2**30:7.2f} GiB"  # noqa: E731
    run, items, acts = p["run"], p["items"], p["items"]["activations"]
    lines = [format_report(p), "",
             f"run plan: micro-batch {run['micro_batch']} × {run['seq_len']} tokens"
             + (f" + {run['media_tokens']} image/video tokens" if run.get("media_tokens") else "")
             + ", activation checkpointing, "
             f"vocab {run['vocab_size']}, sketch budget {run['sketch_budget'] / 2**20:.0f} MiB",
             f"  model weights {gib(items['weights'])}   adapters {gib(items['adapters'])}   "
             f"AdamW {gib(items['optimizer'])}   bases {gib(items['bases'])}",
             f"  activations: checkpoints {gib(acts['checkpoints'])}, one layer's recompute {gib(acts['recompute'])}, "
             f"backward {gib(acts['backward_transients'])}, logits {gib(acts['logits'])}; peak {gib(acts['peak'])} "
             f"(begin_task pass {gib(items['begin_task_activations'])})",
             f"  sketches (all layers): gradient {gib(items['gradient_sketches'])}, input {gib(items['input_sketches'])}",
             f"{'peak':<16}{'device':>14}{'cpu':>14}"]
    fits = "fits" in p["peaks"]["cpu"]
    for key in ("training_step", "begin_task", "end_task", "run"):
        row = f"{key:<16}"
        for placement in ("device", "cpu"):
            mark = ("  " if p["peaks"][placement]["fits"][key] else " ✗") if fits else ""
            row += f"{gib(p['peaks'][placement][key]) + mark:>14}"
        lines.append(row)
    lines.append(f"plain LoRA training step {gib(p['plain_lora_training_step'])}; KeepLoRA++ / plain LoRA: "
                 f"device {p['peaks']['device']['training_vs_plain_lora']:.4f}, "
                 f"cpu {p['peaks']['cpu']['training_vs_plain_lora']:.4f} (plain LoRA training A too, as peft: "
                 f"{gib(p['plain_lora_training_A_training_step'])})")
    if fits:
        verdict = {pl: "fits" if p["peaks"][pl]["fits"]["run"] else "does not fit" for pl in ("device", "cpu")}
        lines.append(f"device memory {gib(run['device_memory'])}, {run['reserve'] / 2**30:.2f} GiB of it reserved (CUDA "
                     f"context, fragmentation): the run {verdict['device']} with 'device', {verdict['cpu']} with 'cpu' "
                     f"(✗: a peak over it)")
    at = items["bases_at_finalise"]
    lines.append(f"'cpu' placement: {gib(p['cpu_placement_host_bytes'])} of pinned host memory for the bases "
                 "('mmap': the same device peaks, the bases in files instead)"
                 + ("" if p["vision_tower_counted"] else "; model weights: the language model only")
                 + f"; on the device while a boundary finalises: {run['resident_layers']} linears' bases "
                 f"(begin_task {gib(at['begin_task'])}, end_task {gib(at['end_task'])} with the new one)")
    ck = p["checkpoint"]
    lines.append(f"checkpoint after {run['tasks']} tasks: full (merged weights, bases, adapters) {gib(ck['full'])}, "
                 f"compact (bases, adapters, per-task r·(in+out) history) {gib(ck['compact'])}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--model-config", required=True,
                        help="llava-1.5-7b, llava-1.5-13b, llava-next-video-7b, qwen2.5-vl-7b or a config.json")
    parser.add_argument("--rank", type=int, default=32, help="adapter rank r (default 32)")
    parser.add_argument("--basis-fraction", type=float, default=0.5, help="k_in / in, in [0, 1) (default 0.5)")
    parser.add_argument("--param-dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    parser.add_argument("--basis-dtype", choices=sorted(DTYPE_BYTES), default="fp32")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    parser.add_argument("--video-tokens", type=int, default=0,
                        help="image/video tokens per sequence beside --seq-len (a VLM's media, default 0)")
    parser.add_argument("--tasks", type=int, default=8, help="tasks, for the checkpoint sizes (default 8)")
    parser.add_argument("--resident-layers", type=int, default=2,
                        help="adapted linears' bases on the device at once while a boundary finalises, with the "
                             "'cpu' placement (default 2: the current one and the prefetched next)")
    parser.add_argument("--sketch-budget", default="64MiB", help="bytes per sketch, e.g. 64MiB (default 64MiB)")
    parser.add_argument("--device-memory", default=None, help="the accelerator's memory, e.g. 24GiB, 80GB, 24000MiB")
    parser.add_argument("--reserve", default="1GiB",
                        help="device memory the peaks do not count: CUDA context, fragmentation (default 1GiB)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(args) -> dict:
    """``kplora memory``: every option checked (``ConfigError``), then the plan printed as a table or JSON
    and returned (:func:`~kplora_kernels.commands.memory_plan.plan`, sizes in bytes)."""
    check_settings(MemoryArgs, {"rank": args.rank, "basis_fraction": args.basis_fraction, "seq_len": args.seq_len,
                                "micro_batch": args.micro_batch, "tasks": args.tasks,
                                "resident_layers": args.resident_layers}, "kplora memory")
    if args.video_tokens < 0:
        raise ConfigError(f"--video-tokens must be an integer ≥ 0, got {args.video_tokens}")
    sketch_budget = parse_size(args.sketch_budget, "--sketch-budget")
    device_memory = None if args.device_memory is None else parse_size(args.device_memory, "--device-memory")
    reserve = parse_size(args.reserve, "--reserve", allow_zero=True)
    cfg = text_config(args.model_config)
    width = min(i for _, _, i in linear_shapes(cfg))
    if args.rank >= width:
        raise ConfigError(f"--rank must be below the layers' input width {width}, got {args.rank}")
    result = plan(cfg, args.rank, args.basis_fraction, args.param_dtype, args.basis_dtype, seq_len=args.seq_len,
                  micro_batch=args.micro_batch, tasks=args.tasks, resident_layers=args.resident_layers,
                  sketch_budget=sketch_budget, device_memory=device_memory, reserve=reserve,
                  media_tokens=args.video_tokens)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return result
