"""The package's top level: the public names resolve, the engine is imported only when asked for."""
import subprocess
import sys

import pytest


def test_top_level_names():
    import kplora_kernels
    from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig
    from kplora_kernels.nn import FusedKeepLoRALinear

    assert kplora_kernels.KeepLoRA is KeepLoRA and kplora_kernels.KeepLoRAConfig is KeepLoRAConfig
    assert kplora_kernels.FusedKeepLoRALinear is FusedKeepLoRALinear
    assert all(hasattr(kplora_kernels, n) for n in kplora_kernels.__all__)
    with pytest.raises(AttributeError, match="no attribute 'KeepLora'"):
        kplora_kernels.KeepLora


def test_importing_the_kernels_does_not_import_the_engine():
    code = "import sys, kplora_kernels; print('kplora_kernels.continual' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_commands_build_without_triton():
    """A CPU-only torch has no Triton: every command but `kernels` must still parse and run."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError("No module named 'triton'")
sys.meta_path.insert(0, Block())
from kplora_kernels.cli import main
sys.exit(main(["memory", "--model-config", "llava-1.5-7b"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GiB" in proc.stdout
