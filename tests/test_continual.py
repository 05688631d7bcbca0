"""The KeepLoRA++ controller on tiny open_clip, tiny LLaVA and a digits task sequence."""
import json
import os

import pytest
import torch
from torch import nn

from helpers import adamw_steps, raises
from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig, metrics, preset
from kplora_kernels.nn import FusedKeepLoRALinear
from kplora_kernels.schedules import layer_scales


# --- metrics -----------------------------------------------------------------------------------

def test_metrics_against_hand_computed():
    a = [[0.9, 0.2, 0.1],
         [0.8, 0.7, 0.3],
         [0.6, 0.5, 0.9]]
    assert metrics.transfer(a) == pytest.approx((0.2 + (0.1 + 0.3) / 2) / 2)
    assert metrics.average(a) == pytest.approx(((0.9 + 0.8 + 0.6) / 3 + (0.2 + 0.7 + 0.5) / 3 + (0.1 + 0.3 + 0.9) / 3) / 3)
    assert metrics.last(a) == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    assert metrics.bwt(a) == pytest.approx(((0.6 - 0.9) + (0.5 - 0.7)) / 2)
    data = json.loads(metrics.to_json([[0.5]]))
    assert data["transfer"] is None and data["last"] == 0.5 and data["bwt"] is None
    with raises(ValueError, "square"):
        metrics.average([[1.0, 2.0]])


# --- tiny models ---------------------------------------------------------------------------------

def tiny_clip():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    return CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=3, width=32, patch_size=8, image_size=32, head_width=16),
                text_cfg=CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=2, layers=2)).eval()


def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=127,
                                                     vision_feature_layer=-2)).eval()


def llava_batch(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((2, 16), 127), torch.randint(0, 120, (2, 8), generator=gen)], 1)
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32, generator=gen), "labels": ids.clone()}


def clip_batch(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 32, 32, generator=gen), torch.randint(1, 100, (4, 16), generator=gen)


def clip_loss(model, batch):
    images, texts = batch
    img = nn.functional.normalize(model.encode_image(images), dim=-1)
    txt = nn.functional.normalize(model.encode_text(texts), dim=-1)
    logits = 10 * img @ txt.T
    labels = torch.arange(len(images))
    return (nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels)) / 2


def llava_loss(model, batch):
    return model(**batch).loss


def protected(layer):
    """The protected input basis, whichever way the layer stores it."""
    from kplora_kernels.subspace.sketch import complement_basis

    return complement_basis(layer.V.float()) if layer.V_complement else layer.V.float()


def snapshot_weights(kl):
    return {name: layer.weight.detach().clone() for name, layer in kl.layers.items()}


def run_one_task(kl, loader, loss_fn, steps=3):
    bases_before = {name: protected(layer) for name, layer in kl.layers.items()}
    weights_before = snapshot_weights(kl)
    kl.begin_task(loader, loss_fn)
    for name, layer in kl.layers.items():
        assert layer.weight.grad is None
        assert torch.count_nonzero(layer.lora_B) == 0
        assert (layer.lora_A @ bases_before[name]).abs().max() < 1e-4, name
    adamw_steps(kl, loader, loss_fn, steps)
    kl.end_task(loader, loss_fn)
    for name, layer in kl.layers.items():
        delta = layer.weight.detach() - weights_before[name]
        assert delta.abs().max() > 0, f"{name} did not change"
        # old-input invariance: the update is zero on the protected inputs of the task start
        V = bases_before[name]
        assert (delta @ V).abs().max() <= 1e-4 * max(1.0, delta.abs().max().item()), name
        assert layer.k_in >= V.shape[1]
    assert any(layer.k_in > bases_before[name].shape[1] for name, layer in kl.layers.items())


def test_open_clip_wrap_keeps_outputs_and_scales_layers():
    model = tiny_clip()
    images, texts = clip_batch(0)
    ref_img, ref_txt = model.encode_image(images), model.encode_text(texts)
    kl = KeepLoRA(model, preset("clip", rank=4), progress=False)
    assert len(kl.layers) == 4 * (3 + 2)  # q, k, v, out of every block of both towers
    torch.testing.assert_close(model.encode_image(images), ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.encode_text(texts), ref_txt, atol=1e-5, rtol=1e-5)
    for name, layer in kl.layers.items():
        assert isinstance(layer, FusedKeepLoRALinear)
        block = int(name.split("resblocks.")[1].split(".")[0])
        expected = layer_scales(3)[block] if name.startswith("visual.") else 1.0  # text: no scaling
        assert layer.layer_scale == pytest.approx(expected)
        assert layer.k_in > 0


def test_open_clip_one_task():
    kl = KeepLoRA(tiny_clip(), preset("clip", rank=4, eps_w={"visual": 0.5, "text": 0.2}), progress=False)
    run_one_task(kl, [clip_batch(s) for s in range(3)], clip_loss)
    assert kl.task_index == 1


def test_tiny_llava_wrap_and_one_task():
    model = tiny_llava()
    batch = llava_batch(0)
    ref = model(**batch).logits
    kl = KeepLoRA(model, preset("llava", rank=4, eps_w={"default": 0.5}), progress=False)
    assert len(kl.layers) == 7 * 3  # q, k, v, o, gate, up, down of every language-model layer
    assert {round(l.layer_scale, 2) for l in kl.layers.values()} == {0.2, 0.6, 1.0}
    assert all("language_model" in name for name in kl.layers)
    assert kl.extra_parameters and all("multi_modal_projector" in n for n in kl.extra_parameters)
    torch.testing.assert_close(model(**batch).logits, ref, atol=1e-5, rtol=1e-5)
    run_one_task(kl, [llava_batch(s) for s in range(2)], llava_loss)


# --- a real task sequence: digits ----------------------------------------------------------------

TASKS = ((0, 1, 2), (3, 4, 5), (6, 7, 8))


class DigitsMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(64, 96), nn.Linear(96, 96), nn.Linear(96, 9)])

    def forward(self, x):
        h = torch.relu(self.layers[0](x))
        return self.layers[2](torch.relu(self.layers[1](h)))


def digits_tasks():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(0)
    tasks = []
    for t, classes in enumerate(TASKS):
        idx = torch.nonzero(torch.isin(y, torch.tensor(classes))).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        split = len(idx) * 2 // 3
        tasks.append(((x[idx[:split]], y[idx[:split]] - 3 * t, t), (x[idx[split:]], y[idx[split:]] - 3 * t, t)))
    return tasks


def task_loss(model, batch):
    x, y, t = batch
    return nn.functional.cross_entropy(model(x)[:, 3 * t:3 * t + 3], y)


def accuracy(model, batch):
    x, y, t = batch
    with torch.no_grad():
        return (model(x)[:, 3 * t:3 * t + 3].argmax(1) == y).float().mean().item()


def config(method):
    return KeepLoRAConfig(method=method, rank=8, alpha=16.0, eps_w={"default": 0.3}, eps_f=0.97,
                          targets=[r"layers\.\d+$"])


def run_sequence(method, tasks, stop_after=None, checkpoint=None, resume_from=None, steps=120):
    """Returns the accuracy matrix (rows: after each trained task)."""
    torch.manual_seed(0)
    model = DigitsMLP()
    if resume_from:
        kl = KeepLoRA.from_checkpoint(model, resume_from, progress=False)
    else:
        kl = KeepLoRA(model, config(method), progress=False)
    rows = []
    for t in range(kl.task_index, len(tasks)):
        train, _ = tasks[t]
        torch.manual_seed(100 + t)
        kl.begin_task([train], task_loss)
        opt = torch.optim.AdamW(kl.trainable_parameters(), lr=1e-2, weight_decay=0.0)
        kl.register_projection_hook(opt)
        for _ in range(steps):
            opt.zero_grad()
            task_loss(model, train).backward()
            opt.step()
        kl.end_task([train], task_loss)
        rows.append([accuracy(model, test) for _, test in tasks])
        if stop_after is not None and t == stop_after:
            kl.save(checkpoint)
            return rows, kl
    return rows, kl


def test_keeplora_forgets_less_than_lora_on_digits():
    tasks = digits_tasks()
    results = {m: run_sequence(m, tasks)[0] for m in ("keeplora++", "lora")}
    for method, acc in results.items():
        for t in range(3):
            assert acc[t][t] > 0.8, f"{method} did not learn task {t}: {acc}"  # chance is 1/3
    assert metrics.bwt(results["keeplora++"]) > metrics.bwt(results["lora"]) + 0.02, results


def test_save_resume_is_exact_and_checkpoints_are_atomic(tmp_path, monkeypatch):
    tasks = digits_tasks()
    full, kl_full = run_sequence("keeplora++", tasks)
    path = str(tmp_path / "kl.safetensors")
    first, _ = run_sequence("keeplora++", tasks, stop_after=0, checkpoint=path)
    rest, kl_resumed = run_sequence(None, tasks, resume_from=path)
    assert first + rest == full
    for name, layer in kl_full.layers.items():
        assert torch.equal(layer.weight, kl_resumed.layers[name].weight)
        assert torch.equal(layer.V, kl_resumed.layers[name].V)
        assert layer.V_complement == kl_resumed.layers[name].V_complement
    # a truncated file fails with a clear error; a failed save leaves the previous checkpoint intact
    truncated = str(tmp_path / "truncated.safetensors")
    with open(path, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read()[: os.path.getsize(path) // 2])
    with raises(ValueError, "truncated or corrupt"):
        KeepLoRA.from_checkpoint(DigitsMLP(), truncated, progress=False)
    before = open(path, "rb").read()

    import safetensors.torch

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with raises(OSError, "disk full"):
        kl_resumed.save(path)
    assert open(path, "rb").read() == before
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_load_refuses_another_architecture(tmp_path):
    path = str(tmp_path / "kl.safetensors")
    kl = KeepLoRA(DigitsMLP(), config("keeplora++"), progress=False)
    kl.save(path)
    other = nn.Module()
    other.layers = nn.ModuleList([nn.Linear(64, 96), nn.Linear(96, 50), nn.Linear(50, 9)])
    with raises(ValueError, "another architecture", "layers.1"):
        KeepLoRA(other, config("keeplora++"), progress=False).load(path)
    with raises(ValueError, "another configuration", "rank"):
        KeepLoRA(DigitsMLP(), KeepLoRAConfig(**{**config("keeplora++").to_dict(), "rank": 4}), progress=False).load(path)
    with raises(FileNotFoundError, "no checkpoint"):
        kl.load(str(tmp_path / "missing.safetensors"))


def test_generic_models_transformers_clip_and_explicit_layer_index():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=2, vocab_size=99),
                                 vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=2, image_size=32, patch_size=8),
                                 projection_dim=16)).eval()
    kl = KeepLoRA(model, KeepLoRAConfig(rank=2, targets=[r"self_attn\.(q|k|v|out)_proj$"],
                                        layer_scaling_towers=["visual"]), progress=False)
    towers = {name: next(t.tower for t in kl.targets if t.name == name) for name in kl.layers}
    assert set(towers.values()) == {"visual", "text"} and len(kl.layers) == 16
    assert {kl.layers[n].layer_scale for n, t in towers.items() if t == "text"} == {1.0}
    flat = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    kl = KeepLoRA(flat, KeepLoRAConfig(rank=2, targets=[r"^\d+$"]), progress=False, layer_index={"0": 0, "2": 1})
    assert [kl.layers[n].layer_scale for n in ("0", "2")] == pytest.approx([0.2, 1.0])
    with raises(ValueError, "layer index", "layer_index"):
        KeepLoRA(nn.Sequential(nn.Linear(8, 8)), KeepLoRAConfig(rank=2, targets=[r"^0$"]), progress=False)


def test_bf16_bases_halve_the_memory_and_still_protect():
    tasks = digits_tasks()
    torch.manual_seed(0)
    model = DigitsMLP()
    kl = KeepLoRA(model, KeepLoRAConfig(**{**config("keeplora++").to_dict(), "basis_dtype": "bf16"}), progress=False)
    assert all(layer.V.dtype == torch.bfloat16 for layer in kl.layers.values())
    train, _ = tasks[0]
    before = {n: (layer.weight.detach().clone(), protected(layer)) for n, layer in kl.layers.items()}
    kl.begin_task([train], task_loss)
    opt = torch.optim.AdamW(kl.trainable_parameters(), lr=1e-2)
    kl.register_projection_hook(opt)
    for _ in range(20):
        opt.zero_grad()
        task_loss(model, train).backward()
        opt.step()
    kl.end_task([train], task_loss)
    for name, layer in kl.layers.items():
        W0, V = before[name]
        delta = layer.weight.detach() - W0
        assert (delta @ V).norm() <= 1e-2 * delta.norm(), name  # bf16 rounding of V: ~1e-3 leaks
        assert layer.V.dtype == torch.bfloat16


def test_config_errors():
    with raises(ValueError, "method"):
        KeepLoRAConfig(method="ewc")
    with raises(ValueError, "eps_f"):
        KeepLoRAConfig(eps_f=0.0)
    with raises(ValueError, "unknown config keys", "rnak"):
        KeepLoRAConfig.from_dict({"rnak": 4})
    with raises(ValueError, "basis_dtype"):
        KeepLoRAConfig(basis_dtype="int8")
    with raises(ValueError, "preset"):
        preset("bert")
    with raises(ValueError, "no nn.Linear matches", "nothing$", "layers.0", "target_modules"):
        KeepLoRA(DigitsMLP(), KeepLoRAConfig(targets=[r"nothing$"]), progress=False)
    wrapped = DigitsMLP()
    KeepLoRA(wrapped, config("keeplora++"), progress=False)
    with raises(ValueError, "already wrapped", "FusedKeepLoRALinear"):
        KeepLoRA(wrapped, config("keeplora++"), progress=False)


def test_bases_past_half_the_space_are_stored_as_complements(tmp_path):
    tasks = digits_tasks()
    torch.manual_seed(0)
    model = DigitsMLP()
    kl = KeepLoRA(model, KeepLoRAConfig(**{**config("keeplora++").to_dict(), "eps_w": {"default": 0.95}}),
                  progress=False)
    stored = {n: (layer.V_complement, layer.V.shape[1], layer.k_in) for n, layer in kl.layers.items()}
    assert any(c for c, _, _ in stored.values())
    for name, (complement, columns, k_in) in stored.items():
        layer = kl.layers[name]
        assert complement == (k_in > layer.in_features / 2) and columns == min(k_in, layer.in_features - k_in)
    train, _ = tasks[0]
    run_one_task(kl, [train], task_loss, steps=10)
    path = str(tmp_path / "c.safetensors")
    kl.save(path)
    torch.manual_seed(0)
    resumed = KeepLoRA.from_checkpoint(DigitsMLP(), path, progress=False)
    for name, layer in kl.layers.items():
        assert resumed.layers[name].V_complement == layer.V_complement
        assert torch.equal(resumed.layers[name].V, layer.V)


def test_open_clip_only_targeted_attentions_are_split_and_unload_loads_into_stock():
    from kplora_kernels.continual.adapters import SplitMultiheadAttention

    model = tiny_clip()
    images, texts = clip_batch(0)
    kl = KeepLoRA(model, preset("clip", rank=4, eps_w={"visual": 0.5}, targets=[r"^visual\..*\.attn\.(q_proj|v_proj)$"]),
                  progress=False)
    assert len(kl.layers) == 2 * 3
    attentions = {n: type(m) for n, m in model.named_modules() if n.endswith(".attn")}
    assert all(t is SplitMultiheadAttention for n, t in attentions.items() if n.startswith("visual."))
    assert all(t is nn.MultiheadAttention for n, t in attentions.items() if not n.startswith("visual."))
    kl.begin_task([clip_batch(s) for s in range(2)], clip_loss)
    with torch.no_grad():
        for layer in kl.layers.values():
            layer.lora_B.normal_(std=0.05)
    img, txt = model.encode_image(images), model.encode_text(texts)
    plain = kl.merge_and_unload()
    stock = tiny_clip()
    stock.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(stock.encode_image(images), img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stock.encode_text(texts), txt, atol=0, rtol=0)  # the text tower is untouched
    with raises(RuntimeError, "merge_and_unload"):
        kl.end_task([clip_batch(0)], clip_loss)
