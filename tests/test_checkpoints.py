"""Compact controller checkpoints (bases + open adapter + low-rank history + fingerprints of the
pre-trained weights), the full form, and the cached principal bases at wrap time."""
import json

import pytest
import torch
from torch import nn

from helpers import assert_same_checkpoint, raises
from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig
from kplora_kernels.continual import bases as bases_module

IN, HID = 32, 48


class MLP(nn.Module):
    def __init__(self, dtype=torch.float32, seed=0, width=HID):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([nn.Linear(IN, width), nn.Linear(width, width), nn.Linear(width, 9)]).to(dtype)

    def forward(self, x):
        return self.layers[2](torch.tanh(self.layers[1](torch.tanh(self.layers[0](x)))))


def make_task(t, n=48, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + t)
    basis = torch.linalg.qr(torch.randn(IN, 6, generator=gen, dtype=torch.float64))[0]
    z = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    return (z @ basis.T).to(dtype), (z @ torch.randn(6, 3, generator=gen, dtype=torch.float64)).argmax(1), t


def task_loss(model, batch):
    x, y, t = batch
    return nn.functional.cross_entropy(model(x)[:, 3 * t:3 * t + 3].float(), y)


def config(method="keeplora++", adapter="lora", **overrides):
    return KeepLoRAConfig(**{**dict(method=method, adapter=adapter, rank=4, alpha=8.0, eps_w={"default": 0.5},
                                    eps_f=0.95, targets=[r"layers\.\d+$"]), **overrides})


def train_task(kl, batch, steps=5):
    kl.begin_task([batch], task_loss)
    opt = torch.optim.AdamW(kl.trainable_parameters(), lr=1e-2)
    handle = kl.register_projection_hook(opt)
    for _ in range(steps):
        opt.zero_grad()
        (task_loss(kl.model, batch) + kl.regularization()).backward()
        opt.step()
    handle.remove()
    kl.end_task([batch], task_loss)


def form(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["kplora"])["form"]


@pytest.mark.parametrize("method,dtype", [("keeplora++", torch.float32), ("keeplora++", torch.bfloat16),
                                          ("lora", torch.float32), ("olora", torch.float32),
                                          ("inflora", torch.float32)])
def test_compact_checkpoint_resumes_bit_identically(method, dtype, tmp_path):
    tasks = [make_task(t, dtype=dtype) for t in range(3)]
    cfg = config(method, eps_w_out=0.5) if method == "keeplora++" else config(method)
    reference = KeepLoRA(MLP(dtype), cfg, progress=False)
    torch.manual_seed(7)
    for batch in tasks:
        train_task(reference, batch)

    kl = KeepLoRA(MLP(dtype), cfg, progress=False)
    torch.manual_seed(7)
    for batch in tasks[:2]:
        train_task(kl, batch)
    path = tmp_path / "compact.safetensors"
    kl.save(path)  # the default: compact where possible
    assert form(path) == "compact"
    resumed = KeepLoRA.from_checkpoint(MLP(dtype), str(path), progress=False)
    assert resumed.task_index == 2
    for name, layer in kl.layers.items():  # the replayed weights equal the merged ones, bit for bit
        assert torch.equal(resumed.layers[name].weight, layer.weight), name
    train_task(resumed, tasks[2])
    for name, layer in reference.layers.items():
        for key in ("weight", "V", "U", "lora_A", "lora_B"):
            assert torch.equal(getattr(resumed.layers[name], key), getattr(layer, key)), (name, key)
    # the resumed run's own compact and full checkpoints equal the uninterrupted run's
    for compact in (True, False):
        a, b = tmp_path / f"ref-{compact}.safetensors", tmp_path / f"resumed-{compact}.safetensors"
        reference.save(a, compact=compact)
        resumed.save(b, compact=compact)
        assert_same_checkpoint(a, b)


def test_compact_checkpoint_saved_inside_a_task_resumes(tmp_path):
    tasks = [make_task(t) for t in range(2)]
    kl = KeepLoRA(MLP(), config(), progress=False)
    train_task(kl, tasks[0])
    kl.begin_task([tasks[1]], task_loss)
    with torch.no_grad():
        for layer in kl.layers.values():
            layer.lora_B.normal_()  # a trained open adapter
    x = tasks[1][0]
    expected = kl.model(x)
    path = tmp_path / "open.safetensors"
    kl.save(path, compact=True)
    resumed = KeepLoRA.from_checkpoint(MLP(), str(path), progress=False)
    assert resumed.task_open and torch.equal(resumed.model(x), expected)


def test_compact_checkpoint_refuses_another_pretrained_model(tmp_path):
    kl = KeepLoRA(MLP(), config(), progress=False)
    train_task(kl, make_task(0))
    path = tmp_path / "c.safetensors"
    kl.save(path)
    with raises(ValueError, "compact", "differ from the pre-trained", "compact=False"):
        KeepLoRA.from_checkpoint(MLP(seed=1), str(path), progress=False)
    # one changed element of one target weight is enough
    model = MLP()
    with torch.no_grad():
        model.layers[1].weight[3, 4] += 1e-3
    with raises(ValueError, "1 of 3 target weights", "layers.1"):
        KeepLoRA.from_checkpoint(model, str(path), progress=False)
    # the full form does not need the pre-trained weights
    kl.save(path, compact=False)
    assert form(path) == "full"
    resumed = KeepLoRA.from_checkpoint(MLP(seed=1), str(path), progress=False)
    assert all(torch.equal(resumed.layers[n].weight, layer.weight) for n, layer in kl.layers.items())


def test_compact_checkpoint_is_much_smaller(tmp_path):
    # 256-wide weights, rank 4: the compact form holds V (at most in/2 columns: past half it is stored
    # as its complement), U (empty), A and B, and 2 history factors per task, i.e. at most about
    # 0.5 + 4·(4·512)/65536 ≈ 0.63 of a weight per layer; the full form holds the weight and V as well
    # (≥ 1 weight per layer), so compact < 0.63 × full. For plain LoRA (no bases) compact holds only
    # the 4·(4·512) adapter elements against a weight's 65536: < 0.15 × full.
    import os

    for method, bound in (("keeplora++", 0.63), ("lora", 0.15)):
        kl = KeepLoRA(MLP(width=256), config(method), progress=False)
        train_task(kl, make_task(0), steps=1)
        compact, full = tmp_path / f"{method}-compact.safetensors", tmp_path / f"{method}-full.safetensors"
        kl.save(compact, compact=True)
        kl.save(full, compact=False)
        assert os.path.getsize(compact) < bound * os.path.getsize(full), method


def test_compact_form_is_impossible_for_full_adapters_and_after_a_full_load(tmp_path):
    kl = KeepLoRA(MLP(), config("keeplora++", "full"), progress=False)
    train_task(kl, make_task(0), steps=2)
    path = tmp_path / "full.safetensors"
    with raises(ValueError, "adapter='full'", "not low-rank", "compact=False"):
        kl.save(path, compact=True)
    kl.save(path)  # the default falls back to the full form, recorded in the file
    assert form(path) == "full"
    lora = KeepLoRA(MLP(), config(), progress=False)
    lora.save(path, compact=False)
    loaded = KeepLoRA.from_checkpoint(MLP(), str(path), progress=False)
    with raises(ValueError, "full-form checkpoint", "history"):
        loaded.save(path, compact=True)
    with raises(TypeError, "compact must be True, False or None", "'yes'"):
        lora.save(path, compact="yes")


def test_merge_and_unload_ends_the_controller(tmp_path):
    model = MLP()
    kl = KeepLoRA(model, config(), progress=False)
    train_task(kl, make_task(0))
    kl.begin_task([make_task(1)], task_loss)
    with torch.no_grad():
        for layer in kl.layers.values():
            layer.lora_B.normal_(std=0.1)  # an open adapter is merged too
    x = make_task(1)[0]
    expected = kl.model(x)
    plain = kl.merge_and_unload()
    assert plain is model and all(type(m) is nn.Linear for m in plain.layers)
    stock = MLP(seed=3)
    stock.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(stock(x), expected, atol=1e-5, rtol=1e-5)
    for call in (lambda: kl.begin_task([make_task(1)], task_loss), lambda: kl.end_task([make_task(1)], task_loss),
                 lambda: kl.save(tmp_path / "x.safetensors"), kl.merge_and_unload):
        with raises(RuntimeError, "merge_and_unload"):
            call()


def test_print_trainable_parameters_matches_peft(capsys):
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["1", "2"])
    peft_model = get_peft_model(MLP(), lora_config)
    peft_model.print_trainable_parameters()
    theirs = capsys.readouterr().out.strip()
    kl = KeepLoRA(MLP(), KeepLoRAConfig.from_peft(lora_config, method="lora"), progress=False)
    kl.begin_task([make_task(0)], task_loss)  # plain LoRA trains A and B, as peft
    kl.print_trainable_parameters()
    ours = capsys.readouterr().out.strip()
    # A and B of layers.1 (48→48) and layers.2 (48→9) at r = 4
    assert ours == theirs and ours.startswith(f"trainable params: {4 * (48 + 48) + 4 * (48 + 9)} ||")


def test_second_wrap_reads_the_cached_bases(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = bases_module.principal_subspace

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(bases_module, "principal_subspace", counting)
    cfg = config(eps_w_out=0.5)
    first = KeepLoRA(MLP(), cfg, progress=False, bases_cache_dir=tmp_path / "bases")
    assert calls["n"] == 2 * 3  # input and output side of three weights
    second = KeepLoRA(MLP(), cfg, progress=False, bases_cache_dir=tmp_path / "bases")
    assert calls["n"] == 2 * 3  # all read back
    uncached = KeepLoRA(MLP(), cfg, progress=False)
    for name, layer in first.layers.items():
        for key in ("V", "U"):
            assert torch.equal(getattr(second.layers[name], key), getattr(layer, key)), (name, key)
            assert torch.equal(getattr(uncached.layers[name], key), getattr(layer, key)), (name, key)
        assert layer.U.shape[1] > 0 and layer.V.shape[1] > 0
    # another model misses the cache
    KeepLoRA(MLP(seed=2), cfg, progress=False, bases_cache_dir=tmp_path / "bases")
    assert calls["n"] == 3 * 2 * 3  # (the uncached wrap decomposed too)
