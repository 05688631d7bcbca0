"""`kplora memory`: the report's per-linear bytes equal what the library actually allocates."""
import json

import pytest
import torch
from torch import nn

from helpers import random_basis
from kplora_kernels.cli import main
from kplora_kernels.memory import linear_shapes, linear_state, report
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
    assert "llava-1.5-7b" in capsys.readouterr().err


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
