"""TargetMatcher: one value for the target spec (peft's target_modules and exclude_modules, regex
patterns, tower rules) that matches, saves, loads and compares."""
import json

import pytest
from torch import nn

from helpers import raises
from kplora_kernels.continual.adapters import find_targets, split_multihead_attention
from kplora_kernels.continual.matching import DEFAULT_TOWERS, TargetMatcher

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.xq_proj", "model.layers.1.mlp.up_proj",
         "lm_head", "visual.transformer.resblocks.3.attn.out_proj", "model.layers.2.self_attn.o_proj",
         "model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("target_modules, exclude_modules", [
    (["q_proj", "o_proj"], ["layers.1.self_attn.q_proj"]), (["q_proj", "up_proj"], r".*\.1\..*"),
    (r".*_proj", ["out_proj", "xq_proj"]), (["proj"], ["lm_head"]),
], ids=str)
def test_exclude_modules_agrees_with_peft(target_modules, exclude_modules):
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    config = peft.LoraConfig(target_modules=target_modules, exclude_modules=exclude_modules)
    matcher = TargetMatcher(target_modules=target_modules, exclude_modules=exclude_modules)
    for name in NAMES:
        found = check_target_module_exists(config, name)  # True, a match, False/None, or _ExcludedModule
        assert matcher.matches_name(name) == (bool(found) and not isinstance(found, _ExcludedModule)), name


def test_match_looks_at_the_module():
    patterns = TargetMatcher(patterns=[r"self_attn"], exclude_modules=["xq_proj"])
    assert patterns.match("model.layers.0.self_attn.q_proj", nn.Linear(2, 2))
    assert not patterns.match("model.layers.0.self_attn", nn.Module())  # a regex may match a parent: passed over
    assert not patterns.match("model.layers.0.self_attn.xq_proj", nn.Linear(2, 2))  # excluded
    names = TargetMatcher(target_modules=["self_attn"])
    with raises(ValueError, "target_modules matches", "'a.self_attn'", "Module", "only nn.Linear"):
        names.match("a.self_attn", nn.Module())
    with raises(ValueError, "'a.self_attn'", "a.self_attn.q_proj"):
        names.match("a.self_attn", nn.MultiheadAttention(4, 2))


def test_equality_round_trip_and_repr():
    a = TargetMatcher(target_modules={"v_proj", "q_proj"}, exclude_modules=["lm_head"])
    b = TargetMatcher(target_modules=["q_proj", "v_proj", "q_proj"], exclude_modules=("lm_head",))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != TargetMatcher(target_modules=["q_proj", "v_proj"])
    assert a != TargetMatcher(target_modules=["q_proj", "v_proj"], exclude_modules=["lm_head"],
                              towers=[("vision", r"^vision\.")])
    assert TargetMatcher(patterns=["a", "b"]) != TargetMatcher(patterns=["b", "a"])  # order is their meaning
    assert repr(a) == "TargetMatcher(target_modules=['q_proj', 'v_proj'], exclude_modules=['lm_head'])"
    custom = TargetMatcher(patterns=[r"\.q$"], towers=[("enc", r"^encoder\.")])
    assert repr(custom) == r"TargetMatcher(patterns=['\\.q$'], towers=[['enc', '^encoder\\.']])"
    for m in (a, custom, TargetMatcher(target_modules=r".*\.q")):
        data = json.loads(json.dumps(m.to_dict()))
        assert TargetMatcher.from_dict(data) == m
    assert a.to_dict() == {"patterns": None, "target_modules": ["q_proj", "v_proj"], "exclude_modules": ["lm_head"],
                           "towers": [list(r) for r in DEFAULT_TOWERS]}
    assert TargetMatcher.from_dict({"target_modules": ["q"]}).towers == DEFAULT_TOWERS
    assert custom.tower("encoder.block.0.q") == "enc" and custom.tower("decoder.block.0.q") is None
    with pytest.raises(AttributeError):
        a.patterns = ("x",)  # frozen


@pytest.mark.parametrize("call, exc, fragments", [
    (lambda: TargetMatcher(), ValueError, ("exactly one",)),
    (lambda: TargetMatcher(patterns=["a"], target_modules=["a"]), ValueError, ("exactly one",)),
    (lambda: TargetMatcher(patterns="q_proj"), TypeError, ("patterns", "str", "['q_proj']")),
    (lambda: TargetMatcher(target_modules=["q"], exclude_modules=3), TypeError, ("exclude_modules", "int")),
    (lambda: TargetMatcher(target_modules=["q"], exclude_modules="("), ValueError, ("exclude_modules", "malformed")),
    (lambda: TargetMatcher(target_modules=["q"], exclude_modules=[""]), TypeError, ("exclude_modules", "''")),
    (lambda: TargetMatcher(target_modules=["q"], towers="visual"), TypeError, ("towers", "str")),
    (lambda: TargetMatcher(target_modules=["q"], towers=[("visual",)]), TypeError, ("towers", "pairs")),
    (lambda: TargetMatcher(target_modules=["q"], towers=[("v", "(")]), ValueError, ("towers", "malformed")),
    (lambda: TargetMatcher.from_dict([]), TypeError, ("dict", "list")),
    (lambda: TargetMatcher.from_dict({"target_modules": ["q"], "layers": 1}), ValueError, ("unknown", "layers")),
    (lambda: find_targets(nn.Linear(2, 2), matcher=TargetMatcher(patterns=["x"]), patterns=["x"]), ValueError,
     ("either matcher", "not both")),
    (lambda: find_targets(nn.Linear(2, 2), matcher={"patterns": ["x"]}), TypeError, ("matcher", "dict")),
    (lambda: split_multihead_attention(nn.Linear(2, 2), exclude_modules=["x"]), ValueError,
     ("exclude_modules", "target spec")),
], ids=lambda v: "" if callable(v) else str(v))
def test_spec_errors(call, exc, fragments):
    with raises(exc, *fragments):
        call()


def test_find_targets_and_split_honour_exclude_modules():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=32))
    names = {t.name for t in find_targets(model, target_modules=["q_proj", "v_proj"],
                                          exclude_modules=["layers.0.self_attn.q_proj"])}
    assert names == {"model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.self_attn.v_proj"}
    with raises(ValueError, "no nn.Linear", "less exclude_modules"):
        find_targets(model, target_modules=["q_proj"], exclude_modules=r".*")

    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module(), nn.Module()])
    for block in model.blocks:
        block.attn = nn.MultiheadAttention(8, 2, batch_first=True)
    matcher = TargetMatcher(target_modules=["out_proj"], exclude_modules=["blocks.1.attn.out_proj"])
    assert split_multihead_attention(model, matcher=matcher) == 1
    assert [t.name for t in find_targets(model, matcher=matcher)] == ["blocks.0.attn.out_proj"]
