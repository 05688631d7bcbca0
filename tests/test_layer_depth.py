"""issue 27 item 7: a target's block index and its tower's depth are read from the model's block
stacks, not from its module path; ambiguity is refused; layer_report shows the mapping."""
import pytest
import torch
from torch import nn

from helpers import raises
from kplora_kernels.continual.adapters import find_targets, layer_report, layer_scale, split_multihead_attention
from kplora_kernels.continual.matching import TargetMatcher


def tiny_t5():
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    return T5Model(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=3, num_decoder_layers=2,
                            num_heads=2))


def layout(targets):
    return {t.name: (t.tower, t.index, t.depth) for t in targets}


def test_t5_depth_is_the_block_not_the_sublayer_and_encoder_decoder_are_two_towers():
    targets = find_targets(tiny_t5(), target_modules=["q", "v"])
    got = layout(targets)
    want = {f"encoder.block.{b}.layer.0.SelfAttention.{p}": ("encoder", b, 3) for b in range(3) for p in "qv"}
    want.update({f"decoder.block.{b}.layer.{m}.{a}.{p}": ("decoder", b, 2) for b in range(2)
                 for m, a in ((0, "SelfAttention"), (1, "EncDecAttention")) for p in "qv"})
    assert got == want  # a path reading would take layer.M (0 or 1) for the depth
    assert {t.stack for t in targets} == {"encoder.block", "decoder.block"}
    scales = {t.name: layer_scale(t, 0.2, "linear") for t in targets}
    assert scales["encoder.block.0.layer.0.SelfAttention.q"] == pytest.approx(0.2)
    assert scales["encoder.block.1.layer.0.SelfAttention.q"] == pytest.approx(0.6)
    assert scales["decoder.block.1.layer.1.EncDecAttention.v"] == pytest.approx(1.0)


def test_tower_rules_rename_and_layer_index_overrides():
    model = tiny_t5()
    matcher = TargetMatcher(target_modules=["q"], towers=[("enc", r"^encoder\.")])
    towers = {t.name.split(".")[0]: t.tower for t in find_targets(model, matcher=matcher)}
    assert towers == {"encoder": "enc", "decoder": "default"}  # one unnamed stack left: "default"
    override = {"decoder.block.1.layer.0.SelfAttention.q": 5}
    got = layout(find_targets(model, target_modules=["q"], layer_index=override))
    assert got["decoder.block.1.layer.0.SelfAttention.q"] == ("decoder", 5, 6)
    assert got["decoder.block.0.layer.0.SelfAttention.q"] == ("decoder", 0, 6)
    for bad in (-1, 1.0, True):
        with raises(ValueError, "layer_index[", "int ≥ 0", repr(bad)):
            find_targets(model, target_modules=["q"], layer_index={"encoder.block.0.layer.0.SelfAttention.q": bad})


def test_gpt2_conv1d_is_refused_clearly_and_its_layout_reads_h_n():
    from transformers import GPT2Config, GPT2Model

    gpt2 = GPT2Model(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16))
    for spec in ({"target_modules": ["c_attn"]}, {"patterns": [r"attn\.c_attn$"]}):
        with raises(NotImplementedError, "'h.0.attn.c_attn'", "Conv1D", "nn.Linear"):
            find_targets(gpt2, **spec)

    class Block(nn.Module):  # GPT-2's layout with nn.Linear in place of Conv1D
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = nn.Module(), nn.Module()
            self.attn.c_attn, self.attn.c_proj = nn.Linear(8, 24), nn.Linear(8, 8)
            self.mlp.c_fc = nn.Linear(8, 32)

    model = nn.Module()
    model.transformer = nn.Module()
    model.transformer.h = nn.ModuleList([Block() for _ in range(4)])
    got = layout(find_targets(model, target_modules=["c_attn", "c_fc"]))
    assert got == {f"transformer.h.{i}.{p}": ("text", i, 4) for i in range(4) for p in ("attn.c_attn", "mlp.c_fc")}


def test_llama_clip_and_llava_layouts_unchanged():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=32))
    got = layout(find_targets(llama, target_modules=["q_proj", "down_proj"]))
    assert got == {f"model.layers.{i}.{p}": ("default", i, 3) for i in range(3)
                   for p in ("self_attn.q_proj", "mlp.down_proj")}

    class ResBlock(nn.Module):  # open_clip's residual block
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    clip = nn.Module()
    clip.visual, clip.transformer = nn.Module(), nn.Module()
    clip.visual.transformer = nn.Module()
    clip.visual.transformer.resblocks = nn.ModuleList([ResBlock() for _ in range(3)])
    clip.transformer.resblocks = nn.ModuleList([ResBlock() for _ in range(2)])
    spec = [r"\.attn\.(q_proj|out_proj)$", r"mlp\.0$"]
    split_multihead_attention(clip, spec)
    got = layout(find_targets(clip, spec))
    assert got == {**{f"visual.transformer.resblocks.{i}.{p}": ("visual", i, 3) for i in range(3)
                      for p in ("attn.q_proj", "attn.out_proj", "mlp.0")},
                   **{f"transformer.resblocks.{i}.{p}": ("text", i, 2) for i in range(2)
                      for p in ("attn.q_proj", "attn.out_proj", "mlp.0")}}

    def stack(n):
        layers = nn.ModuleList([nn.Module() for _ in range(n)])
        for layer in layers:
            layer.self_attn = nn.Module()
            layer.self_attn.q_proj = nn.Linear(4, 4)
        return layers

    llava = nn.Module()
    llava.model = nn.Module()
    llava.model.language_model, llava.model.vision_tower = nn.Module(), nn.Module()
    llava.model.language_model.layers = stack(4)
    llava.model.vision_tower.vision_model = nn.Module()
    llava.model.vision_tower.vision_model.encoder = nn.Module()
    llava.model.vision_tower.vision_model.encoder.layers = stack(2)
    got = {t.name: (t.tower, t.index, t.depth) for t in find_targets(llava, target_modules=["q_proj"])}
    assert got == {**{f"model.language_model.layers.{i}.self_attn.q_proj": ("default", i, 4) for i in range(4)},
                   **{f"model.vision_tower.vision_model.encoder.layers.{i}.self_attn.q_proj": ("visual", i, 2)
                      for i in range(2)}}


def test_ambiguous_structures_are_refused_naming_layer_index():
    def blocks(n, cls=nn.Module):
        out = nn.ModuleList([cls() for _ in range(n)])
        for b in out:
            b.q = nn.Linear(4, 4)
        return out

    two = nn.Module()  # two stacks in one named tower
    two.visual = nn.Module()
    two.visual.blocks, two.visual.merger = blocks(3), blocks(2)
    with raises(ValueError, "tower 'visual'", "'visual.blocks' (3 blocks)", "'visual.merger' (2 blocks)",
                "layer_index"):
        find_targets(two, target_modules=["q"])

    class StageA(nn.Module):
        pass

    class StageB(nn.Module):
        pass

    stages = nn.Module()  # stages of differing classes: the outer list is no block stack
    stages.stages = nn.ModuleList([StageA(), StageB()])
    stages.stages[0].blocks, stages.stages[1].blocks = blocks(2), blocks(2)
    with raises(ValueError, "'stages.0.blocks'", "'stages.1.blocks'", "layer_index"):
        find_targets(stages, target_modules=["q"])
    index = {f"stages.{s}.blocks.{b}.q": 2 * s + b for s in range(2) for b in range(2)}
    assert {t.index for t in find_targets(stages, target_modules=["q"], layer_index=index)} == {0, 1, 2, 3}

    loose = nn.Module()  # blocks as attributes, no container
    loose.block0, loose.block1 = nn.Linear(4, 4), nn.Linear(4, 4)
    with raises(ValueError, "cannot find the layer index", "'block0'", "layer_index={'block0': index}"):
        find_targets(loose, [r"block\d$"])


def test_layer_report_shows_tower_index_depth_and_scale():
    targets = find_targets(tiny_t5(), target_modules=["q"])
    report = layer_report(targets, schedule="linear", gamma=0.2, towers=["encoder", "decoder"])
    rows = {line.split()[0]: line.split()[1:] for line in report.splitlines()[2:] if ".block." in line.split()[0]}
    assert rows["encoder.block.0.layer.0.SelfAttention.q"] == ["encoder", "0", "3", "0.2000"]
    assert rows["encoder.block.2.layer.0.SelfAttention.q"] == ["encoder", "2", "3", "1.0000"]
    assert rows["decoder.block.1.layer.1.EncDecAttention.q"] == ["decoder", "1", "2", "1.0000"]
    assert "tower 'encoder': 3 blocks (encoder.block), 3 targets" in report
    only = layer_report(targets, schedule="linear", towers=["default"])
    assert "1.0000 (not scaled)" in only and "scaled towers ['default'] hold no target" in only
    plain = layer_report(targets)
    assert plain.splitlines()[0].split() == ["target", "tower", "index", "depth"]
    with raises(ValueError, "at least one Target"):
        layer_report([])
    with raises(TypeError, "Target", "str"):
        layer_report(["encoder.block.0"])
    with raises(TypeError, "towers", "str"):
        layer_report(targets, schedule="linear", towers="encoder")


def test_controller_scales_t5_by_its_block_stacks_and_reports_the_mapping(capsys):
    """Through KeepLoRA: the default towers (["default"]) name none of T5's towers, so nothing would be
    scaled: refused, naming the towers; with the towers named each layer gets the scale of its block in
    its own stack, also when only some blocks are targeted (the depth is the stack's, not the targets')."""
    from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig

    with raises(ValueError, "layer_scaling_towers", "'decoder'", "'encoder'"):
        KeepLoRA(tiny_t5(), KeepLoRAConfig(target_modules=["q", "v"], rank=2, eps_w={"default": 0.5}), progress=False)
    # the targets of one stack form the "default" tower
    cfg = KeepLoRAConfig(target_modules=r"encoder\.block\.[01]\..*\.q", rank=2, eps_w={"default": 0.5})
    kl = KeepLoRA(tiny_t5(), cfg, progress=False)
    scales = {name: layer.layer_scale for name, layer in kl.layers.items()}
    assert scales == pytest.approx({"encoder.block.0.layer.0.SelfAttention.q": 0.2,  # 3 blocks: 0.2, 0.6, 1.0
                                    "encoder.block.1.layer.0.SelfAttention.q": 0.6})
    kl.print_trainable_parameters(layers=True)
    out = capsys.readouterr().out
    assert "trainable params:" in out and "encoder.block.1.layer.0.SelfAttention.q" in out and "0.6000" in out


def test_a_model_wrapped_with_layer_index_resumes_from_its_checkpoint(tmp_path):
    """Targets in no block stack need layer_index at wrap; the checkpoint keeps it for from_checkpoint."""
    from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

    cfg = KeepLoRAConfig(targets=[r"^[02]$"], rank=2, eps_w={"default": 0.5})
    kl = KeepLoRA(model(), cfg, progress=False, layer_index={"0": 0, "2": 1})
    path = str(tmp_path / "c.safetensors")
    kl.save(path)
    again = KeepLoRA.from_checkpoint(model(), path, progress=False)
    assert {n: l.layer_scale for n, l in again.layers.items()} == {n: l.layer_scale for n, l in kl.layers.items()}
    with raises(ValueError, "layer_index"):
        KeepLoRA(model(), cfg, progress=False)
