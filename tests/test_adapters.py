"""Adapters: splitting nn.MultiheadAttention faithfully, choosing targets (regexes and peft's
``target_modules``), and refusing targets whose adapter would never run."""
import itertools

import pytest
import torch
from torch import nn

from helpers import raises
from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig
from kplora_kernels.continual.adapters import (SplitMultiheadAttention, find_targets, merge_and_unload, replace_module,
                                               peft_matcher, regex_matcher, split_multihead_attention,
                                               target_matcher)
from kplora_kernels.nn import FusedKeepLoRALinear

E, HEADS, N, L, S = 16, 4, 3, 5, 7


def make_mha(batch_first=True, bias=True, add_bias_kv=False, add_zero_attn=False, cross=False, dropout=0.0):
    torch.manual_seed(0)
    kw = dict(kdim=12, vdim=10) if cross else {}
    mha = nn.MultiheadAttention(E, HEADS, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                                add_zero_attn=add_zero_attn, batch_first=batch_first, dtype=torch.float64, **kw)
    if bias:
        with torch.no_grad():  # nonzero biases, so that a dropped bias would show
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha.eval()


def inputs(mha, batched=True, self_attention=False):
    gen = torch.Generator().manual_seed(1)
    lead = ((N,) if batched else ())

    def t(length, dim):
        x = torch.randn(*lead, length, dim, generator=gen, dtype=torch.float64)
        return x.transpose(0, 1) if batched and not mha.batch_first else x

    if self_attention:
        x = t(L, E)
        return x, x, x
    return t(L, E), t(S, mha.kdim), t(S, mha.vdim)


def masks(kind, src=S, length=L, batched=True):
    gen = torch.Generator().manual_seed(2)
    bool_attn = torch.rand(length, src, generator=gen) < 0.3
    bool_attn[:, 0] = False  # every query sees at least one key
    padding = torch.zeros(N, src, dtype=torch.bool)
    padding[0, -2:] = True
    padding[2, -1] = True
    out = {"none": {},
           "bool attn": {"attn_mask": bool_attn},
           "float attn 3-D": {"attn_mask": torch.randn(N * HEADS, length, src, generator=gen, dtype=torch.float64)},
           "bool padding": {"key_padding_mask": padding},
           "float padding": {"key_padding_mask": torch.zeros(N, src, dtype=torch.float64).masked_fill(padding, -1e4)},
           "both": {"attn_mask": bool_attn, "key_padding_mask": padding}}[kind]
    if not batched:
        out = {k: (v[0] if k == "key_padding_mask" else v) for k, v in out.items() if not (k == "attn_mask" and v.dim() == 3)}
    return out


OPTIONS = list(itertools.product([True, False], [True, False], [True, False], [True, False], [False, True]))


@pytest.mark.parametrize("batch_first, bias, add_bias_kv, add_zero_attn, cross", OPTIONS,
                         ids=lambda v: str(int(v)))
def test_split_attention_equals_the_packed_one_for_every_option(batch_first, bias, add_bias_kv, add_zero_attn, cross):
    """issue 14 item 2: add_bias_kv, add_zero_attn, kdim/vdim, masks and need_weights all kept."""
    mha = make_mha(batch_first, bias, add_bias_kv, add_zero_attn, cross)
    split = SplitMultiheadAttention(mha)
    q, k, v = inputs(mha)
    for kind in ("none", "bool attn", "float attn 3-D", "bool padding", "float padding", "both"):
        for need_weights, average in ((False, True), (True, True), (True, False)):
            kw = dict(masks(kind), need_weights=need_weights, average_attn_weights=average)
            want, want_w = mha(q, k, v, **kw)
            got, got_w = split(q, k, v, **kw)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10, msg=f"{kind}, need_weights={need_weights}")
            if need_weights:
                torch.testing.assert_close(got_w, want_w, atol=1e-12, rtol=1e-10)
            else:
                assert got_w is None and want_w is None


@pytest.mark.parametrize("add_bias_kv, add_zero_attn", [(False, False), (True, True)])
def test_split_attention_unbatched_self_attention_and_default_need_weights(add_bias_kv, add_zero_attn):
    mha = make_mha(add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
    split = SplitMultiheadAttention(mha)
    for batched in (True, False):
        q, k, v = inputs(mha, batched=batched, self_attention=True)
        for kind in ("none", "bool attn", "bool padding"):
            kw = masks(kind, src=L, batched=batched)
            (want, want_w), (got, got_w) = mha(q, k, v, **kw), split(q, k, v, **kw)  # need_weights defaults to True
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(got_w, want_w, atol=1e-12, rtol=1e-10)


def test_split_attention_is_causal_and_gradients():
    mha = make_mha()
    split = SplitMultiheadAttention(mha)
    x = inputs(mha, self_attention=True)[0]
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    for need_weights in (False, True):
        kw = dict(attn_mask=causal, is_causal=True, need_weights=need_weights)
        torch.testing.assert_close(split(x, x, x, **kw)[0], mha(x, x, x, **kw)[0], atol=1e-12, rtol=1e-10)
    with raises(RuntimeError, "is_causal", "attn_mask"):
        split(x, x, x, is_causal=True)
    mha.train()
    split.train()
    grads = []
    for module in (mha, split):
        xg = x.detach().clone().requires_grad_(True)
        module(xg, xg, xg, need_weights=False)[0].pow(2).sum().backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-12, rtol=1e-10)


def test_split_attention_shares_storage_and_refuses_bad_masks():
    mha = make_mha()
    split = SplitMultiheadAttention(mha)
    assert split.q_proj.weight.data_ptr() == mha.in_proj_weight.data_ptr()
    assert split.out_proj is mha.out_proj
    q, k, v = inputs(mha)
    with raises(ValueError, "key_padding_mask", "(3, 7)", "(3, 5)"):
        split(q, k, v, key_padding_mask=torch.zeros(N, L, dtype=torch.bool))
    with raises(ValueError, "attn_mask", "(5, 7)", "(7, 5)"):
        split(q, k, v, attn_mask=torch.zeros(S, L, dtype=torch.bool))
    with raises(ValueError, "attn_mask", "(12, 5, 7)"):
        split(q, k, v, attn_mask=torch.zeros(N, L, S))
    with raises(TypeError, "nn.MultiheadAttention", "Linear"):
        SplitMultiheadAttention(nn.Linear(2, 2))


class TwoAttentions(nn.Module):
    """A packed self-attention (targeted) and a cross-attention with kdim ≠ embed_dim."""

    def __init__(self, **kw):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module(), nn.Module()])
        self.blocks[0].attn = nn.MultiheadAttention(E, HEADS, batch_first=True, add_bias_kv=True, **kw)
        self.blocks[1].cross = nn.MultiheadAttention(E, HEADS, batch_first=True, kdim=12, vdim=12,
                                                     add_zero_attn=True, **kw)

    def forward(self, x, memory):
        x = x + self.blocks[0].attn(x, x, x, need_weights=False)[0]
        return x + self.blocks[1].cross(x, memory, memory, need_weights=False)[0]


def two_attention_batch():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(N, L, E, generator=gen), torch.randn(N, S, 12, generator=gen)


def test_only_targeted_attentions_are_split():
    model = TwoAttentions()
    assert split_multihead_attention(model, [r"blocks\.0\.attn\.(q|v)_proj$"]) == 1
    assert isinstance(model.blocks[0].attn, SplitMultiheadAttention)
    assert type(model.blocks[1].cross) is nn.MultiheadAttention
    model = TwoAttentions()
    assert split_multihead_attention(model, target_modules=["out_proj"]) == 2
    model = TwoAttentions()
    assert split_multihead_attention(model, target_modules=["mlp"]) == 0
    assert split_multihead_attention(TwoAttentions()) == 2  # no spec: all of them, as before


def test_out_proj_of_a_packed_attention_is_refused_and_split_makes_it_run():
    """issue 14 item 3: an out_proj adapter inside a packed attention would never run."""
    model = TwoAttentions()
    with raises(ValueError, "blocks.1.cross.out_proj", "packed", "never run", "split_multihead_attention"):
        find_targets(model, [r"cross\.out_proj$"])
    with raises(ValueError, "blocks.0.attn.out_proj", "split_multihead_attention"):
        find_targets(model, target_modules=["out_proj"])
    split_multihead_attention(model, [r"cross\.out_proj$"])
    [target] = find_targets(model, [r"cross\.out_proj$"])
    layer = FusedKeepLoRALinear.from_linear(model.get_submodule(target.name), rank=2)
    model.blocks[1].cross.out_proj = layer
    x, memory = two_attention_batch()
    model(x, memory).pow(2).sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().max() > 0


def test_keeplora_wrap_keeps_outputs_of_attentions_with_every_option():
    torch.manual_seed(0)
    model = TwoAttentions(dropout=0.1).eval()
    x, memory = two_attention_batch()
    ref = model(x, memory)
    kl = KeepLoRA(model, KeepLoRAConfig(rank=2, targets=[r"\.(q|k|v|out)_proj$"]), progress=False)
    assert len(kl.layers) == 8
    torch.testing.assert_close(model(x, memory), ref, atol=1e-5, rtol=1e-5)


# --- target specs ---------------------------------------------------------------------------------------

NAMES = ["q_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.xq_proj",
         "model.layers.10.self_attn.k_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.up_proj.base",
         "lm_head", "model.embed_tokens", "visual.transformer.resblocks.3.attn.out_proj", "up_proj_extra",
         "model.layers.2.self_attn.o_proj", "encoder.layer.0.attention.self.query"]


@pytest.mark.parametrize("target_modules", [
    ["q_proj", "k_proj"], ["up_proj"], ["self_attn.q_proj"], {"o_proj", "lm_head"}, ["query"], ["proj"],
    r".*\.(q|k)_proj", r"model\.layers\.\d\..*", r"q_proj", r".*attn.*", ["layers.0.self_attn.q_proj"],
], ids=str)
def test_peft_matcher_agrees_with_peft(target_modules):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=target_modules)
    matches = peft_matcher(target_modules)
    for name in NAMES:
        assert matches(name) == bool(check_target_module_exists(config, name)), name


def test_find_targets_with_peft_target_modules_on_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=32))
    names = {t.name for t in find_targets(model, target_modules=["q_proj", "v_proj"])}
    assert names == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    names = {t.name for t in find_targets(model, target_modules=r".*\.1\.mlp\.(up|down)_proj")}
    assert names == {"model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}
    regex = {t.name for t in find_targets(model, [r"q_proj"])}  # re.search: a substring
    assert regex == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}


@pytest.mark.parametrize("call, exc, fragments", [
    (lambda: regex_matcher(r"q_proj$"), TypeError, ("patterns", "str", "[")),
    (lambda: regex_matcher({"a": 1}), TypeError, ("patterns", "dict")),
    (lambda: regex_matcher([r"q_proj(", "x"]), ValueError, ("malformed", "q_proj(")),
    (lambda: regex_matcher([3]), TypeError, ("patterns", "int", "3")),
    (lambda: peft_matcher("all-linear"), ValueError, ("all-linear", "list")),
    (lambda: peft_matcher(r"(q"), ValueError, ("target_modules", "malformed")),
    (lambda: peft_matcher(3), TypeError, ("target_modules", "int")),
    (lambda: peft_matcher(["q_proj", ""]), TypeError, ("target_modules", "''")),
    (lambda: target_matcher(), ValueError, ("exactly one",)),
    (lambda: target_matcher([r"a"], ["a"]), ValueError, ("exactly one",)),
    (lambda: find_targets(nn.Sequential(nn.Linear(2, 2)), [r"^0$"], layer_index=[0]), TypeError, ("layer_index", "list")),
    (lambda: find_targets(nn.Sequential(nn.Linear(2, 2)), target_modules=["1"]), ValueError, ("no nn.Linear", "['1']")),
    (lambda: split_multihead_attention(TwoAttentions(), "attn"), TypeError, ("patterns", "str")),
], ids=lambda v: "" if callable(v) else str(v))
def test_target_spec_errors(call, exc, fragments):
    with raises(exc, *fragments):
        call()


def test_merge_and_unload_gives_back_packed_attentions_with_every_option():
    torch.manual_seed(0)
    model = TwoAttentions().eval()
    stock_state = {k: v.clone() for k, v in model.state_dict().items()}
    x, memory = two_attention_batch()
    split_multihead_attention(model)
    for parent in (model.blocks[0].attn, model.blocks[1].cross):
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            layer = FusedKeepLoRALinear.from_linear(getattr(parent, p), rank=2)
            with torch.no_grad():
                layer.lora_B.normal_()
            setattr(parent, p, layer)
    wrapped_out = model(x, memory)
    plain = merge_and_unload(model)
    assert plain is model
    assert type(model.blocks[0].attn) is nn.MultiheadAttention and type(model.blocks[1].cross) is nn.MultiheadAttention
    assert not any(isinstance(m, (FusedKeepLoRALinear, SplitMultiheadAttention)) for m in model.modules())
    torch.testing.assert_close(model(x, memory), wrapped_out, atol=1e-5, rtol=1e-5)
    fresh = TwoAttentions()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert model.state_dict().keys() == stock_state.keys()
    changed = [k for k in stock_state if not torch.equal(stock_state[k], model.state_dict()[k])]
    assert sorted(changed) == sorted(k for k in stock_state if "proj_weight" in k or "out_proj.weight" in k)


def encoder(**kw):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True, **kw)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()


@pytest.mark.parametrize("targets", [[r"linear1$"], [r"self_attn\.out_proj$", r"linear2$"], [r"(q|v)_proj$"]], ids=str)
def test_transformer_encoder_fused_path_does_not_skip_adapters(targets):
    """nn.TransformerEncoderLayer's fused inference path reads linear1/linear2 and the packed
    attention weights directly: an adapter there must still run (its attention is split)."""
    model = encoder()
    x = torch.randn(N, L, E)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[0, -2:] = True
    if "proj$" not in targets[0]:  # before the split: refused, the adapter would be skipped
        with raises(ValueError, "never run", "split_multihead_attention"):
            find_targets(model, targets)
    split_multihead_attention(model, targets)
    layers = []
    for target in find_targets(model, targets):
        layer = FusedKeepLoRALinear.from_linear(model.get_submodule(target.name), rank=2)
        with torch.no_grad():
            layer.lora_B.normal_()
        replace_module(model, target.name, layer)
        layers.append(layer)
    with torch.no_grad():
        wrapped = [model(x), model(x, src_key_padding_mask=padding)]
    merge_and_unload(model)  # the stock model again, fused paths and all, with the adapters merged
    with torch.no_grad():
        stock = [model(x), model(x, src_key_padding_mask=padding)]
    torch.testing.assert_close(wrapped[0], stock[0], atol=1e-5, rtol=1e-5)
    keep = ~padding.unsqueeze(-1).expand_as(stock[1])  # the nested path zeroes padded positions
    torch.testing.assert_close(wrapped[1][keep], stock[1][keep], atol=1e-5, rtol=1e-5)


def test_tied_weights_and_non_linear_peft_targets_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, vocab_size=32, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with raises(ValueError, "'lm_head'", "model.embed_tokens", "tied"):
        find_targets(model, [r"lm_head$"], layer_index={"lm_head": 0})
    with raises(ValueError, "'model.embed_tokens'", "Embedding", "only nn.Linear"):
        find_targets(model, target_modules=["q_proj", "embed_tokens"])
    with raises(ValueError, "'model.layers.0.self_attn'", "LlamaAttention"):
        find_targets(model, target_modules=["self_attn"])
    assert len(find_targets(model, [r"embed_tokens|q_proj"])) == 1  # regexes: non-linears are passed over
    attention = TwoAttentions()
    with raises(ValueError, "'blocks.0.attn'", "MultiheadAttention", "blocks.0.attn.q_proj"):
        find_targets(attention, target_modules=["attn"])
