"""peft-style configuration: ``target_modules`` with peft's meaning, ``KeepLoRAConfig.from_peft``
with real ``peft.LoraConfig`` objects, and the adapters' dropout."""
import pytest
import torch
from torch import nn

from helpers import raises
from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig
from kplora_kernels.nn import FusedKeepLoRALinear

peft = pytest.importorskip("peft")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(16, 16) for _ in range(4))
        self.xq_proj = nn.Linear(16, 16)  # not a suffix match of "q_proj"
        self.mlp = nn.Linear(16, 16)

    def forward(self, x):
        return self.mlp(self.o_proj(self.q_proj(x) + self.k_proj(x) + self.v_proj(x) + self.xq_proj(x)))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Block() for _ in range(2)])

    def forward(self, x):
        for block in self.layers:
            x = torch.tanh(block(x))
        return x


def peft_targets(lora_config) -> set:
    from peft.tuners.lora import LoraLayer

    model = peft.get_peft_model(Tiny(), lora_config)
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj"], ["o_proj", "mlp"], r".*\.(k|v)_proj",
                                            r"layers\.1\.q_proj"])
def test_from_peft_adapts_the_modules_peft_adapts(target_modules):
    lora_config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=target_modules)
    cfg = KeepLoRAConfig.from_peft(lora_config, method="lora", eps_w={"default": 0.5})
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.method) == (4, 16.0, 0.1, "lora")
    kl = KeepLoRA(Tiny(), cfg, progress=False)
    assert set(kl.layers) == peft_targets(lora_config)
    for layer in kl.layers.values():
        assert layer.scaling == pytest.approx(16 / 4)  # peft's lora_alpha / r
        assert isinstance(layer.dropout, nn.Dropout) and layer.dropout.p == 0.1


@pytest.mark.parametrize("exclude_modules", [["layers.0.q_proj"], r"layers\.1\..*"])
def test_from_peft_excludes_the_modules_peft_excludes(exclude_modules):
    lora_config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], exclude_modules=exclude_modules)
    cfg = KeepLoRAConfig.from_peft(lora_config, method="lora", eps_w={"default": 0.5})
    assert cfg.exclude_modules is not None
    kl = KeepLoRA(Tiny(), cfg, progress=False)
    assert set(kl.layers) == peft_targets(lora_config) and len(kl.layers) < 4


def test_a_checkpoint_of_other_targets_is_refused(tmp_path):
    base = dict(method="lora", eps_w={"default": 0.5}, target_modules=["q_proj", "v_proj"])
    kl = KeepLoRA(Tiny(), KeepLoRAConfig(**base), progress=False)
    path = str(tmp_path / "c.safetensors")
    kl.save(path)
    same = KeepLoRA(Tiny(), KeepLoRAConfig(**{**base, "target_modules": ["v_proj", "q_proj", "q_proj"]}), progress=False)
    same.load(path)  # the same spec written otherwise: the same modules
    other = KeepLoRA(Tiny(), KeepLoRAConfig(**base, exclude_modules=["layers.1.v_proj"]), progress=False)
    with raises(ValueError, "checkpoint"):
        other.load(path)


def test_from_peft_refuses_options_it_cannot_honour():
    base = dict(r=4, target_modules=["q_proj"])
    for option, value in [("use_dora", True), ("use_rslora", True), ("bias", "all"), ("layers_to_transform", [0]),
                          ("modules_to_save", ["mlp"]),
                          ("init_lora_weights", "gaussian"), ("rank_pattern", {"q_proj": 8}),
                          ("alpha_pattern", {"q_proj": 8}), ("fan_in_fan_out", True)]:
        with raises(ValueError, f"LoraConfig.{option}=", "cannot be honoured"):
            KeepLoRAConfig.from_peft(peft.LoraConfig(**base, **{option: value}))
    with raises(ValueError, "target_modules is None", "list the modules"):
        KeepLoRAConfig.from_peft(peft.LoraConfig(r=4))
    with raises(TypeError, "peft.LoraConfig", "dict"):
        KeepLoRAConfig.from_peft({"r": 4})
    with raises(ValueError, "unknown config keys", "rnak"):
        KeepLoRAConfig.from_peft(peft.LoraConfig(**base), rnak=3)
    with raises(ValueError, "all-linear"):
        KeepLoRAConfig.from_peft(peft.LoraConfig(r=4, target_modules="all-linear"))


def test_target_modules_field_validation_and_round_trip():
    cfg = KeepLoRAConfig(target_modules={"v_proj", "q_proj"})
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert KeepLoRAConfig.from_dict(cfg.to_dict()) == cfg
    with raises(ValueError, "not both", "targets=", "target_modules="):
        KeepLoRAConfig(targets=[r"q_proj$"], target_modules=["q_proj"])
    with raises(TypeError, "target_modules", "int"):
        KeepLoRAConfig(target_modules=3)
    with raises(ValueError, "malformed regular expression"):
        KeepLoRAConfig(target_modules="(")
    with raises(ValueError, "at least one module"):
        KeepLoRAConfig(target_modules=[])
    for bad, exc in ((1.0, ValueError), (-0.1, ValueError), (True, TypeError), ("0.1", TypeError)):
        with raises(exc, "dropout"):
            KeepLoRAConfig(dropout=bad)


def test_target_modules_refuses_a_non_linear_match():
    with raises(ValueError, "target_modules matches", "only nn.Linear"):
        KeepLoRA(Tiny(), KeepLoRAConfig(target_modules=["layers.0"], eps_w={"default": 0.5}), progress=False)


def test_dropout_trains_through_the_layer():
    cfg = KeepLoRAConfig(method="lora", target_modules=["q_proj"], dropout=0.5, rank=2)
    kl = KeepLoRA(Tiny().train(), cfg, progress=False)
    x = torch.randn(8, 16)
    kl.begin_task([x], lambda m, b: m(b).square().mean())
    layer = kl.layers["layers.0.q_proj"]
    assert isinstance(layer, FusedKeepLoRALinear) and layer.dropout.p == 0.5
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.manual_seed(0)
    a = kl.model(x)
    torch.manual_seed(1)
    b = kl.model(x)
    assert not torch.equal(a, b)  # the adapter branch sees dropped inputs in training
    kl.model.eval()
    assert torch.equal(kl.model(x), kl.model(x))
