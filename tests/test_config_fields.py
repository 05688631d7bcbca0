"""One declaration per setting: KeepLoRAConfig's fields carry their help, range and choices
(config_file.setting), the commands embed those declarations, and the config enforces them."""
import dataclasses

import pytest

from kplora_kernels.commands.demo import DemoConfig
from kplora_kernels.commands.llava import LLaVAConfig
from kplora_kernels.commands.mtil import MTILConfig
from kplora_kernels.commands.vlm import VLMConfig
from kplora_kernels.config_file import ConfigError, check_settings
from kplora_kernels.continual import KeepLoRAConfig

LIBRARY = {f.name: f for f in dataclasses.fields(KeepLoRAConfig)}
SHARED = {"method": "method", "rank": "rank", "alpha": "alpha", "eps_f": "eps_f", "eps_w": "eps_w",
          "eps_w_visual": "eps_w", "eps_w_text": "eps_w"}
BOUNDS = ("ge", "gt", "le", "lt", "choices")


def test_every_library_field_is_declared_with_help():
    assert all(f.metadata.get("help") for f in LIBRARY.values()), [n for n, f in LIBRARY.items() if not f.metadata]


@pytest.mark.parametrize("command", [DemoConfig, MTILConfig, LLaVAConfig, VLMConfig], ids=lambda c: c.__name__)
def test_commands_embed_the_library_declarations(command):
    embedded = 0
    for f in dataclasses.fields(command):
        if f.name in SHARED:
            ours = LIBRARY[SHARED[f.name]].metadata
            assert {k: f.metadata[k] for k in BOUNDS} == {k: ours[k] for k in BOUNDS}, f.name
            embedded += 1
    assert embedded >= 3


@pytest.mark.parametrize("name", [n for n, f in LIBRARY.items()
                                  if any(f.metadata.get(k) is not None for k in ("ge", "gt", "le", "lt"))])
def test_the_config_enforces_each_declared_bound(name):
    """Just outside each declared bound the library config refuses the value, as the commands' checker does."""
    meta = LIBRARY[name].metadata
    integer = isinstance(LIBRARY[name].default, int) and not isinstance(LIBRARY[name].default, bool)
    step = 1 if integer else 1e-6
    outside = [meta["ge"] - step if meta["ge"] is not None else None, meta["gt"] if meta["gt"] is not None else None,
               meta["le"] + step if meta["le"] is not None else None, meta["lt"] if meta["lt"] is not None else None]
    for value in (v for v in outside if v is not None):
        value = {"eps_w": {"default": value}}.get(name, value)
        with pytest.raises((ValueError, TypeError), match=name):
            KeepLoRAConfig(**{name: value})
        if name != "eps_w":
            with pytest.raises(ConfigError, match=name):
                check_settings(KeepLoRAConfig, {name: value})


def test_setting_of_an_unknown_field_is_refused():
    with pytest.raises(ValueError, match="'rnak'"):
        KeepLoRAConfig.setting("rnak", 3)


def test_a_tower_without_eps_w_is_refused_not_defaulted():
    cfg = KeepLoRAConfig(eps_w={"encoder": 0.5})
    assert cfg.eps_for("encoder") == 0.5
    with pytest.raises(ValueError, match="'decoder'.*'default'"):
        cfg.eps_for("decoder")
    assert KeepLoRAConfig(eps_w={"encoder": 0.5, "default": 0.7}).eps_for("decoder") == 0.7


def test_exclude_modules_alone_is_checked_under_its_own_name():
    assert KeepLoRAConfig(exclude_modules={"v_proj", "lm_head"}).exclude_modules == ["lm_head", "v_proj"]
    assert KeepLoRAConfig(exclude_modules=r".*\.mlp\..*").exclude_modules == r".*\.mlp\..*"
    with pytest.raises(TypeError, match="exclude_modules"):
        KeepLoRAConfig(exclude_modules=[3])
    with pytest.raises(ValueError, match="exclude_modules"):
        KeepLoRAConfig(exclude_modules="all-linear")
