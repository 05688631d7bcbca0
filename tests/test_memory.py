"""`kplora memory`: the report's per-linear bytes equal what the library actually allocates."""
import json

import pytest
import torch
from torch import nn

from helpers import random_basis
from kplora_kernels.cli import main
from kplora_kernels.commands.memory_plan import linear_shapes, linear_state, report
from kplora_kernels.nn import FusedKeepLoRALinear
from kplora_kernels.subspace import GradientSketch, InputSketch

SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}


@pytest.mark.parametrize("fraction", [0.5, 0.75], ids=["basis", "complement"])
@pytest.mark.parametrize("budget", [2**30, 8 * 1024], ids=["exact sketches", "randomized sketches"])
def test_report_matches_the_allocated_state(budget, fraction):
    from kplora_kernels.subspace.sketch import complement_basis

    rank = 4
    shared_inputs = {}
    for name, out, in_ in linear_shapes(SMALL):
        predicted = linear_state(name, out, in_, rank, fraction, param_bytes=2, basis_bytes=4, budget=budget)
        layer = FusedKeepLoRALinear.from_linear(nn.Linear(in_, out, dtype=torch.bfloat16), rank)
        k_in = min(round(fraction * in_), in_ - rank)
        V = random_basis(in_, k_in, torch.float32)
        if k_in > in_ / 2:  # what the controller stores past half the space
            layer.set_bases(V=complement_basis(V), V_complement=True)
        else:
            layer.set_bases(V=V)
        opt = torch.optim.AdamW([layer.lora_B], lr=1e-3)
        layer(torch.randn(3, in_, dtype=torch.bfloat16)).float().sum().backward()
        opt.step()
        adapter = sum(t.nbytes for t in (layer.lora_A, layer.lora_B, layer.lora_B.grad))
        optimizer = sum(v.nbytes for v in opt.state[layer.lora_B].values() if v.dim() > 0)
        assert (adapter, optimizer, layer.V.nbytes) == (predicted.adapter, predicted.optimizer, predicted.basis)
        grad = GradientSketch(out, in_, rank, V=layer.V, V_complement=layer.V_complement, memory_budget=budget)
        assert grad.memory_bytes == predicted.gradient_sketch, name
        group = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(name, name)
        sketch = InputSketch(in_, layer.V, V_complement=layer.V_complement, memory_budget=budget)
        reused = group in shared_inputs and sketch.strategy == "covariance"
        shared_inputs.setdefault(group, sketch)
        assert (0 if reused else sketch.memory_bytes) == predicted.input_sketch, name


def test_kv_heads_and_totals():
    shapes = dict((n, (o, i)) for n, o, i in linear_shapes(SMALL))
    assert shapes["k_proj"] == (32, 64) and shapes["down_proj"] == (64, 96)
    r = report(SMALL, rank=4)
    per_linear = r["per_linear"].values()
    assert r["total_persistent"] == 2 * sum(s["adapter"] + s["optimizer"] + s["basis"] for s in per_linear)
    assert r["authors_transient"] == 2 * 4 * sum(o * i for o, i in shapes.values())


def test_memory_command(tmp_path, capsys):
    assert main(["memory", "--model-config", "llava-1.5-7b"]) == 0
    out = capsys.readouterr().out
    assert "down_proj" in out and "GiB" in out
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"text_config": SMALL, "model_type": "llava"}))
    assert main(["memory", "--model-config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["hidden_size"] == 64
    assert main(["memory", "--model-config", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert "llava-1.5-7b" in err and "nope.json" in err and "no such file" in err
    assert main(["memory", "--model-config", "llama"]) == 2
    assert "'llama' (not a preset name)" in capsys.readouterr().err


@pytest.mark.parametrize("change,fragment", [
    ({"hidden_size": "4096"}, "hidden_size must be an integer ≥ 1, got '4096'"),
    ({"num_hidden_layers": -2}, "num_hidden_layers must be an integer ≥ 1, got -2"),
    ({"intermediate_size": 96.5}, "intermediate_size must be an integer ≥ 1, got 96.5"),
    ({"num_key_value_heads": 3}, "must be a multiple of"),
])
def test_memory_bad_model_config_is_one_line(tmp_path, capsys, change, fragment):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"text_config": {**SMALL, **change}}))
    assert main(["memory", "--model-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args,fragment", [
    (["--rank", "0"], "rank must be an integer ≥ 1, got 0"),
    (["--rank", "64"], "--rank must be below the layers' input width 64"),
    (["--basis-fraction", "1.0"], "basis_fraction must be a number ≥ 0 and < 1, got 1.0"),
    (["--basis-fraction", "-0.1"], "basis_fraction must be a number ≥ 0 and < 1, got -0.1"),
])
def test_memory_bad_arguments_are_one_line(tmp_path, capsys, args, fragment):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMALL))
    assert main(["memory", "--model-config", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err


def test_memory_into_a_closed_pipe_has_no_traceback():
    """`kplora memory … --json | head -1`: the reader leaves before the report is written."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "kplora_kernels", "memory", "--model-config", "llava-1.5-7b",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has even imported torch
    err = proc.stderr.read().decode()
    proc.wait()
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


# --- the run plan: three peaks, two placements ------------------------------------------------------------
def _tiny_llama(layers, adapters_rank=None, gradient_sketch=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SMALL_LM, num_hidden_layers=layers, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.requires_grad_(False)
    if adapters_rank:
        for layer in model.model.layers:
            for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                  (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                for n in names:
                    layer = FusedKeepLoRALinear.from_linear(getattr(parent, n), adapters_rank)
                    if gradient_sketch:  # as KeepLoRA's begin_task pass does
                        layer.grad_accumulator = GradientSketch(layer.out_features, layer.in_features, adapters_rank)
                    setattr(parent, n, layer)
    return model


SMALL_LM = {"hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 500}


def _saved_bytes(model, tokens, checkpointing):
    """Bytes of the tensors autograd saves in one forward (parameters and buffers excluded, each
    storage once)."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in owned:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, SMALL_LM["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("gradient_sketch", [False, True], ids=["training", "begin_task pass"])
def test_activation_estimate_matches_autograd_saved_tensors(gradient_sketch):
    """One decoder layer's saved tensors (KeepLoRA adapters, SDPA, bf16) and the checkpointed hidden
    state per layer, measured as the difference between a 4- and a 2-layer model (shared tensors such
    as RoPE's tables and the logits cancel). Tolerance 2 %: the formula counts each saved tensor, a
    transformers release that saves one more small tensor (a per-token scalar) stays within it."""
    from kplora_kernels.commands.memory_plan import activation_bytes, layer_saved_bytes

    tokens, rank = 48, 4
    cfg = {**SMALL_LM, "num_hidden_layers": 1}
    saved = lambda layers, ckpt: _saved_bytes(_tiny_llama(layers, rank, gradient_sketch), tokens, ckpt)  # noqa: E731
    per_layer = (saved(4, False) - saved(2, False)) / 2
    assert per_layer == pytest.approx(layer_saved_bytes(cfg, tokens, rank, 2, gradient_sketch), rel=0.02)
    checkpoint = (saved(4, True) - saved(2, True)) / 2
    assert checkpoint == pytest.approx(activation_bytes(cfg, tokens, rank, 2)["checkpoints"], rel=0.02)


def test_model_params_match_a_llama():
    from kplora_kernels.commands.memory_plan import model_params

    model = _tiny_llama(3)
    assert model_params({**SMALL_LM, "num_hidden_layers": 3}) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["q_proj", "gate_proj", "down_proj"])
def test_default_budget_sketches_at_7b_match_the_library(name):
    """At LLaVA-1.5-7B's shapes and the default budget: the thin gradient sketch and the input sketch
    (exact covariance for in = 4096, randomized for 11008) allocate what the plan counts."""
    from kplora_kernels.commands.memory import text_config

    out, in_ = {n: (o, i) for n, o, i in linear_shapes(text_config("llava-1.5-7b"))}[name]
    predicted = linear_state(name, out, in_, 32, 0.5, param_bytes=2, basis_bytes=4)
    grad = GradientSketch(out, in_, 32)
    assert grad.strategy == "randomized" and grad.memory_bytes == predicted.gradient_sketch
    sketch = InputSketch(in_)
    assert sketch.memory_bytes == predicted.input_sketch
    assert sketch.strategy == ("covariance" if in_ == 4096 else "randomized")


def test_plan_peaks_and_placements():
    from kplora_kernels.commands.memory_plan import plan

    cfg = {**SMALL, "vocab_size": 100}
    p = plan(cfg, rank=4, seq_len=16, micro_batch=2, tasks=3, resident_layers=1, device_memory=10**12)
    items, peaks = p["items"], p["peaks"]
    assert p["run"]["tokens"] == 32
    assert peaks["cpu"]["training_step"] == p["plain_lora_training_step"] < p["plain_lora_training_A_training_step"]
    assert peaks["device"]["training_step"] - peaks["cpu"]["training_step"] == items["bases"] == \
        2 * sum(s["basis"] for s in p["per_linear"].values())
    assert peaks["cpu"]["training_vs_plain_lora"] == 1.0
    for placement in ("device", "cpu"):
        assert peaks[placement]["run"] == max(peaks[placement][k] for k in ("training_step", "begin_task", "end_task"))
        assert peaks[placement]["begin_task"] >= peaks[placement]["training_step"] - items["bases"] + items["gradient_sketches"]
        assert all(peaks[placement]["fits"].values())
    assert peaks["cpu"]["end_task"] < peaks["device"]["end_task"]  # one linear's bases at a time, not all
    linears = 2 * len(linear_shapes(cfg))
    every_plan = plan(cfg, rank=4, seq_len=16, micro_batch=2, resident_layers=linears)  # = all resident
    every = every_plan["peaks"]
    assert every_plan["items"]["bases_at_finalise"]["begin_task"] == items["bases"]  # the window holds every basis
    assert every["cpu"]["begin_task"] <= every["device"]["begin_task"]  # but none during the pass
    assert peaks["cpu"]["end_task"] < every["cpu"]["end_task"] <= every["device"]["end_task"]
    window = plan(cfg, rank=4, seq_len=16, micro_batch=2, resident_layers=2)
    biggest = max(s["basis"] for s in window["per_linear"].values())
    assert window["items"]["bases_at_finalise"]["end_task"] <= 3 * biggest
    ck, pb = p["checkpoint"], 2
    history = 3 * 2 * sum(4 * (o + i) * pb for _, o, i in linear_shapes(cfg))
    assert ck["compact"] - ck["task_history"] == ck["full"] - items["weights"] and ck["task_history"] == history
    same = {"rank": 4, "seq_len": 16, "micro_batch": 2, "resident_layers": 1}
    tight = plan(cfg, **same, device_memory=peaks["cpu"]["training_step"] + 100, reserve=100)["peaks"]["cpu"]["fits"]
    assert tight["training_step"] and not tight["end_task"] and not tight["run"]
    over = plan(cfg, **same, device_memory=peaks["cpu"]["training_step"] + 100, reserve=101)["peaks"]["cpu"]["fits"]
    assert not over["training_step"]


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("24000MiB", 24000 * 2**20),
                                           ("1.5 gib", int(1.5 * 2**30)), ("512B", 512)])
def test_parse_size(text, expected):
    from kplora_kernels.commands.memory import parse_size

    assert parse_size(text) == expected


def test_memory_plan_command(capsys):
    assert main(["memory", "--model-config", "llava-1.5-7b", "--device-memory", "24GiB", "--tasks", "4"]) == 0
    out = capsys.readouterr().out
    assert "training_step" in out and "end_task" in out and "plain LoRA" in out and "compact" in out
    assert main(["memory", "--model-config", "llava-1.5-7b", "--device-memory", "80GB", "--seq-len", "1024",
                 "--micro-batch", "2", "--sketch-budget", "16MiB", "--reserve", "0GiB", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["run"]["tokens"] == 2048 and p["run"]["device_memory"] == 80 * 10**9
    assert p["run"]["sketch_budget"] == 16 * 2**20 and p["peaks"]["device"]["fits"]["run"] and p["run"]["reserve"] == 0


@pytest.mark.parametrize("args,fragment", [
    (["--device-memory", "24"], "--device-memory must be a positive size with a unit"),
    (["--device-memory", "24 parsecs"], "got '24 parsecs'"),
    (["--device-memory", "0GiB"], "--device-memory must be a positive size"),
    (["--sketch-budget", "lots"], "--sketch-budget must be a positive size"),
    (["--reserve=-1GiB"], "--reserve must be a size ≥ 0 with a unit"),
    (["--seq-len", "0"], "seq_len must be an integer ≥ 1, got 0"),
    (["--micro-batch", "-1"], "micro_batch must be an integer ≥ 1, got -1"),
    (["--tasks", "0"], "tasks must be an integer ≥ 1, got 0"),
    (["--resident-layers", "0"], "resident_layers must be an integer ≥ 1, got 0"),
])
def test_memory_bad_plan_arguments_are_one_line(capsys, args, fragment):
    assert main(["memory", "--model-config", "llava-1.5-7b", *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err


def test_gpu_memory_script_smoke_run_on_cpu(tmp_path, monkeypatch):
    """bench/gpu_memory.py (the GPU measurement beside the plan) runs end to end on a tiny stack."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "bench" / "gpu_memory.py"
    spec = importlib.util.spec_from_file_location("gpu_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("OUT", str(tmp_path))
    results = module.main(["--device", "cpu", "--tiny", "--layers", "2"])
    assert set(results["phases"]) == {"device", "cpu"}
    for r in results["phases"].values():
        assert r["bases_total"] > 0 and r["gradient_sketches"] > 0 and r["peak"]["training_step"] is None
    assert json.loads((tmp_path / "gpu_memory.json").read_text())["layers"] == 2


# --- shapes read from the model built on the meta device -----------------------------------------------
def _real_linears(model_cls_config):
    """``{leaf: (out, in)}`` of the first decoder block of a model built for real (CPU, random weights)."""
    block = next(m for n, m in model_cls_config.named_modules() if n.endswith("layers.0"))
    return {n.rpartition(".")[2]: (m.out_features, m.in_features) for n, m in block.named_modules()
            if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("family", ["qwen3-head_dim", "mistral-hidden-not-multiple", "qwen2-vl-text_config"])
def test_memory_reads_the_linears_of_the_built_model(tmp_path, capsys, family):
    """An explicit head_dim (Qwen3, Mistral-Nemo-style: hidden not a multiple of the heads), GQA, and a
    VLM's text_config: the plan's shapes and parameter count equal those of the model transformers builds."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from kplora_kernels.commands.memory import text_config
    from kplora_kernels.commands.memory_plan import model_params

    raw = {"qwen3-head_dim": {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "vocab_size": 100},
           "mistral-hidden-not-multiple": {"model_type": "mistral", "hidden_size": 60, "intermediate_size": 96,
                                           "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
                                           "head_dim": 16, "vocab_size": 100},
           "qwen2-vl-text_config": {"model_type": "qwen2_vl",
                                    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                    "num_attention_heads": 2, "num_key_value_heads": 1,
                                                    "vocab_size": 100, "rope_scaling": {"type": "mrope",
                                                                                        "mrope_section": [2, 2, 4]}},
                                    "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2,
                                                      "patch_size": 8}}}[family]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    config = AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items() if k != "model_type"})
    vlm = "text_config" in raw
    model = (AutoModelForImageTextToText if vlm else AutoModelForCausalLM).from_config(config)
    cfg = text_config(str(path))
    assert {n: (o, i) for n, o, i in linear_shapes(cfg)} == _real_linears(model)
    assert model_params(cfg) == sum(p.numel() for p in model.parameters())
    assert (cfg["vision_params"] > 0) == vlm
    assert main(["memory", "--model-config", str(path), "--rank", "4", "--json"]) == 0
    shapes = json.loads(capsys.readouterr().out)["per_linear"]
    assert {n: tuple(s["shape"]) for n, s in shapes.items()} == _real_linears(model)


@pytest.mark.parametrize("name,params,linears", [("qwen2.5-vl-7b", 8.29e9, {"k_proj": [512, 3584], "down_proj": [3584, 18944]}),
                                                 ("llava-next-video-7b", 7.06e9, {"k_proj": [4096, 4096]})])
def test_memory_vlm_presets_and_video_tokens(capsys, name, params, linears):
    """The built-in VLM configs print a plan in GiB with the whole model's parameters (vision tower
    included); video tokens per sequence add to the language model's tokens."""
    assert main(["memory", "--model-config", name]) == 0
    out = capsys.readouterr().out
    assert "GiB" in out and "model weights: the language model only" not in out
    assert main(["memory", "--model-config", name, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["items"]["weights"] == pytest.approx(2 * params, rel=0.01)
    assert all(plain["per_linear"][k]["shape"] == v for k, v in linears.items())
    assert main(["memory", "--model-config", name, "--video-tokens", "1000", "--seq-len", "1024", "--json"]) == 0
    video = json.loads(capsys.readouterr().out)
    assert video["run"]["tokens"] == 2024
    # every layer's checkpointed hidden state grows with the tokens: 1024 + 1000 against the default 2048
    assert video["items"]["activations"]["checkpoints"] * 2048 == plain["items"]["activations"]["checkpoints"] * 2024
    assert main(["memory", "--model-config", name, "--video-tokens", "-1"]) == 2
    assert "--video-tokens must be an integer ≥ 0, got -1" in capsys.readouterr().err
