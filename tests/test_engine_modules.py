"""The engine by concern (issue 28): the strategies see a narrow context, never the engine, and no
module of the engine hides an import cycle behind ``TYPE_CHECKING``."""
import ast
import os

import pytest

from kplora_kernels.continual import REGISTRY, KeepLoRAConfig
from kplora_kernels.continual.context import EngineContext

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kplora_kernels", "continual")
ENGINE = ("controller", "context", "boundary", "checkpoint", "methods", "adapter_modes", "config", "bases",
          "report", "values", "inputs", "placement")


def _imports(module: str) -> set:
    tree = ast.parse(open(os.path.join(ROOT, f"{module}.py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


@pytest.mark.parametrize("module", ENGINE)
def test_no_hidden_import_cycle_and_small_modules(module):
    text = open(os.path.join(ROOT, f"{module}.py")).read()
    assert "TYPE_CHECKING" not in text, module
    assert len(text.splitlines()) <= 450, module


@pytest.mark.parametrize("module", ["methods", "adapter_modes", "context", "boundary", "bases"])
def test_strategies_do_not_import_the_engine(module):
    assert ".controller" not in _imports(module), module


def test_every_method_declares_its_options_and_full_mode_support():
    options = {o for cls in REGISTRY.values() for o in cls.options}
    assert options == {"eps_w_out", "olora_lambda1", "olora_lambda2"}
    for name, cls in REGISTRY.items():
        if cls.supports_full:
            assert KeepLoRAConfig(method=name, adapter="full").adapter == "full"
        else:
            with pytest.raises(ValueError, match="adapter='full'"):
                KeepLoRAConfig(method=name, adapter="full")
    assert set(EngineContext.__dataclass_fields__) == {"model", "layers", "config", "task_index", "process_group",
                                                       "placement", "progress", "trainable"}
