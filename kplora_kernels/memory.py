"""``kplora memory``: what the KeepLoRA++ state costs per layer and in total for an LLM config.

Counts, per adapted linear (q, k, v, o, gate, up, down of every decoder layer): the adapter
(``A`` r×in frozen, ``B`` out×r with its gradient and two AdamW moments), the protected
basis ``V`` (in×k_in), and the transient sketches (the task-start gradient sketch of each linear,
the task-end input sketch shared by q, k, v and by gate, up) as the library allocates them.
``k_in`` depends on the pre-trained spectrum and ``ε_w``; it is given as a fraction of ``in``.

Bases in bf16 halve the basis memory but let 2e-3 of each projected update leak into the
protected subspace (measured: ``‖P(G) V‖ / ‖P(G)‖`` for a random G, 4096 wide, k = 2048; 6.6e-7
with fp32 bases), so fp32 stays the default. Storing the complement when ``k_in > in/2`` is not
implemented by the layer yet, so it is not counted.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .config_file import ConfigError, check_settings, setting
from .subspace.sketch import DEFAULT_MEMORY_BUDGET, gradient_sketch_bytes

PRESETS = {  # LLaVA-1.5 language models (Vicuna-1.5, LLaMA-2 shapes)
    "llava-1.5-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 32},
    "llava-1.5-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                      "num_attention_heads": 40, "num_key_value_heads": 40},
}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class MemoryArgs:
    """The command-line settings of ``kplora memory``."""

    rank: int = setting(32, "adapter rank r", ge=1)
    basis_fraction: float = setting(0.5, "k_in / in", ge=0, lt=1)


@dataclass
class ModelShape:
    """The keys of a transformers ``config.json`` that the report reads."""

    hidden_size: int = setting(4096, "", ge=1)
    intermediate_size: int = setting(11008, "", ge=1)
    num_hidden_layers: int = setting(32, "", ge=1)
    num_attention_heads: int = setting(32, "", ge=1)
    num_key_value_heads: int = setting(32, "", ge=1)


def text_config(name_or_path: str) -> dict:
    """A preset name, or a transformers ``config.json`` (LLaVA: its ``text_config``; LLaMA: itself).
    A missing file, a missing key or a value of the wrong type or sign is a ``ConfigError``."""
    if name_or_path in PRESETS:
        return dict(PRESETS[name_or_path])
    if not os.path.isfile(name_or_path):
        raise ConfigError(f"--model-config must be one of {sorted(PRESETS)} or a config.json file, "
                          f"got {name_or_path}")
    try:
        with open(name_or_path) as f:
            cfg = json.load(f)
    except ValueError as exc:
        raise ConfigError(f"cannot parse {name_or_path}: {exc}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("text_config", cfg), dict):
        raise ConfigError(f"{name_or_path} must hold a mapping (a LLaMA-style or LLaVA config.json)")
    cfg = cfg.get("text_config", cfg)
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers") if k not in cfg]
    if missing:
        raise ConfigError(f"{name_or_path} lacks {missing} (a LLaMA-style or LLaVA config.json is expected)")
    check_settings(ModelShape, cfg, name_or_path)
    heads, kv = cfg.get("num_attention_heads", 1), cfg.get("num_key_value_heads", cfg.get("num_attention_heads", 1))
    if cfg["hidden_size"] % heads or heads % kv:
        raise ConfigError(f"{name_or_path}: hidden_size {cfg['hidden_size']} must be a multiple of "
                          f"num_attention_heads {heads}, and that of num_key_value_heads {kv}")
    return cfg


def linear_shapes(cfg: dict) -> list[tuple[str, int, int]]:
    """``(name, out, in)`` of the adapted linears of one decoder layer."""
    h, m = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h * cfg.get("num_key_value_heads", cfg.get("num_attention_heads", 1)) // cfg.get("num_attention_heads", 1)
    return [("q_proj", h, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, h),
            ("gate_proj", m, h), ("up_proj", m, h), ("down_proj", h, m)]


@dataclass
class LinearState:
    """Bytes of one adapted linear's KeepLoRA++ state."""

    adapter: int          # A, B and B's gradient, in the parameter dtype
    optimizer: int        # AdamW's two moments of B (torch keeps them in the parameter dtype)
    basis: int            # V or its complement, whichever is smaller, in the basis dtype
    gradient_sketch: int  # transient, at task start
    input_sketch: int     # transient, at task end (0 for k, v, up when they share q's, gate's)

    @property
    def persistent(self) -> int:
        return self.adapter + self.optimizer + self.basis


def linear_state(name: str, out: int, in_: int, rank: int, basis_fraction: float, param_bytes: int,
                 basis_bytes: int, budget: int = DEFAULT_MEMORY_BUDGET, oversample: int = 8) -> LinearState:
    k_in = min(int(round(basis_fraction * in_)), in_ - rank)
    stored = in_ - k_in if k_in > in_ / 2 else k_in  # past half the space the complement is kept
    gradient = gradient_sketch_bytes(out, in_, rank, oversample, budget)  # what GradientSketch's "auto" allocates
    if name in ("k_proj", "v_proj", "up_proj") and 4 * in_ * in_ <= budget:
        inputs = 0  # the exact covariance of q's (gate's) input serves k and v (up)
    elif 4 * in_ * in_ <= budget:
        inputs = 4 * in_ * in_
    else:
        width = max(1, min(in_, budget // (4 * in_), 1024))
        inputs = 2 * 4 * in_ * width  # the residual sketch and its test matrix
    return LinearState(adapter=param_bytes * (rank * in_ + 2 * out * rank), optimizer=2 * param_bytes * out * rank,
                       basis=basis_bytes * in_ * stored, gradient_sketch=gradient, input_sketch=inputs)


def report(cfg: dict, rank: int = 32, basis_fraction: float = 0.5, param_dtype: str = "bf16",
           basis_dtype: str = "fp32") -> dict:
    layers = cfg["num_hidden_layers"]
    per_linear = {name: linear_state(name, out, in_, rank, basis_fraction, DTYPE_BYTES[param_dtype],
                                     DTYPE_BYTES[basis_dtype]) for name, out, in_ in linear_shapes(cfg)}
    per_layer = {field: sum(getattr(s, field) for s in per_linear.values())
                 for field in ("adapter", "optimizer", "basis", "gradient_sketch", "input_sketch")}
    shapes = {name: [out, in_] for name, out, in_ in linear_shapes(cfg)}
    dense_gradients = sum(4 * o * i for o, i in shapes.values())
    return {
        "config": {**{k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")},
                   "rank": rank, "basis_fraction": basis_fraction, "param_dtype": param_dtype,
                   "basis_dtype": basis_dtype},
        "per_linear": {n: {**vars(s), "shape": shapes[n]} for n, s in per_linear.items()},
        "per_layer": per_layer,
        "total_persistent": layers * sum(s.persistent for s in per_linear.values()),
        "peak_transient": max(per_layer["gradient_sketch"], per_layer["input_sketch"]) * layers,
        "authors_transient": layers * dense_gradients,  # full fp32 gradients of every adapted weight
    }


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
