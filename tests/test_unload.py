"""Leaving the library: merge_and_unload gives back the stock model (transformers, open_clip), and a
wrapped transformers model can be written with save_pretrained."""
import pytest
import torch
from torch import nn

from helpers import adamw_steps
from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig, preset
from kplora_kernels.continual.adapters import SplitMultiheadAttention, merge_and_unload
from kplora_kernels.nn import FusedKeepLoRALinear

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             vocab_size=64)
TARGETS = [r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"]


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def llama_batches():
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(0, 64, (2, 12), generator=gen)), "labels": ids} for _ in range(2)]


def llama_loss(model, batch):
    return model(**batch).loss


def train_steps(kl, batches, loss_fn, steps=2):
    """A task start and a few AdamW steps: the adapters' B become nonzero."""
    kl.begin_task(batches, loss_fn)
    adamw_steps(kl, batches, loss_fn, steps)
    assert all(layer.lora_B.abs().max() > 0 for layer in kl.layers.values())


def wrapped_llama():
    model = tiny_llama()
    kl = KeepLoRA(model, KeepLoRAConfig(rank=4, alpha=8.0, eps_w={"default": 0.5}, targets=TARGETS), progress=False)
    train_steps(kl, llama_batches(), llama_loss)
    return model, kl


def test_llama_merge_and_unload_save_pretrained_from_pretrained(tmp_path):
    from transformers import LlamaForCausalLM

    model, kl = wrapped_llama()
    ids = llama_batches()[0]["input_ids"]
    with torch.no_grad():
        wrapped = model(input_ids=ids).logits
    plain = merge_and_unload(kl.model)
    assert plain is model
    assert not any(isinstance(m, FusedKeepLoRALinear) for m in model.modules())
    assert all(type(model.get_submodule(name)) is nn.Linear for name in kl.layers)
    with torch.no_grad():
        unloaded = model(input_ids=ids).logits
    # the merge rounds c·B·A into the fp32 weight once: a few fp32 roundings of the logits
    torch.testing.assert_close(unloaded, wrapped, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, unloaded)
    stock = tiny_llama(seed=1)
    stock.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(stock(input_ids=ids).logits, unloaded)


def test_wrapped_llama_save_pretrained_writes_and_reloads_into_a_wrapped_model(tmp_path):
    """issue 16: save_pretrained on a wrapped model crashed on the layers' dict extra state."""
    from safetensors.torch import load_file

    model, kl = wrapped_llama()
    ids = llama_batches()[0]["input_ids"]
    with torch.no_grad():
        wrapped = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    name = next(iter(kl.layers))
    assert {f"{name}.{k}" for k in ("lora_A", "lora_B", "V", "U", "_extra_state")} <= set(state)
    fresh = tiny_llama(seed=2)
    KeepLoRA(fresh, kl.config, progress=False, compute_bases=False)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, wrapped)


def test_unload_after_the_task_end_and_twice():
    model, kl = wrapped_llama()
    kl.end_task(llama_batches(), llama_loss)
    ids = llama_batches()[1]["input_ids"]
    with torch.no_grad():
        wrapped = model(input_ids=ids).logits
    merge_and_unload(model)
    merge_and_unload(model)  # nothing left to unload: a no-op
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, wrapped)  # merged already: no rounding at all
    tiny_llama(seed=1).load_state_dict(model.state_dict(), strict=True)


def test_open_clip_wrap_unload_loads_into_a_stock_model():
    from test_continual import clip_batch, clip_loss, tiny_clip

    model = tiny_clip()
    kl = KeepLoRA(model, preset("clip", rank=4, eps_w={"visual": 0.5, "text": 0.2}), progress=False)
    assert any(isinstance(m, SplitMultiheadAttention) for m in model.modules())
    train_steps(kl, [clip_batch(s) for s in range(2)], clip_loss)
    images, texts = clip_batch(5)
    with torch.no_grad():
        wrapped = model.encode_image(images), model.encode_text(texts)
    merge_and_unload(model)
    assert not any(isinstance(m, (FusedKeepLoRALinear, SplitMultiheadAttention)) for m in model.modules())
    with torch.no_grad():
        unloaded = model.encode_image(images), model.encode_text(texts)
    for got, want in zip(unloaded, wrapped):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.manual_seed(3)
    stock = tiny_clip()
    stock.load_state_dict(model.state_dict(), strict=True)
    assert type(stock.visual.transformer.resblocks[0].attn) is nn.MultiheadAttention
    with torch.no_grad():
        for got, want in zip((stock.encode_image(images), stock.encode_text(texts)), unloaded):
            assert torch.equal(got, want)


def test_unload_refuses_nothing_and_keeps_a_bare_layer():
    layer = FusedKeepLoRALinear.from_linear(nn.Linear(8, 6), rank=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 8)
    want = layer(x)
    linear = merge_and_unload(layer)
    assert type(linear) is nn.Linear
    torch.testing.assert_close(linear(x), want)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    back = merge_and_unload(SplitMultiheadAttention(mha))
    assert type(back) is nn.MultiheadAttention
    assert torch.equal(back.in_proj_weight, mha.in_proj_weight)
    with pytest.raises(TypeError, match="merge_and_unload"):
        split = SplitMultiheadAttention(mha)
        split.q_proj = FusedKeepLoRALinear.from_linear(split.q_proj, rank=2)
        split.to_multihead_attention()
