"""The README's Python snippets run as written (with a tiny model and data for the names the
controller snippet leaves to the reader)."""
import os
import re

import torch
from torch import nn

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def snippets() -> list[str]:
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.attn = nn.Module()
        self.attn.q_proj, self.attn.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return x + self.attn.out_proj(torch.tanh(self.attn.q_proj(x)))


class Tiny(nn.Module):
    """Names like open_clip's (``blocks.<i>.attn.q_proj``), so that ``preset("clip")`` finds them."""

    def __init__(self, width=16, classes=3):
        super().__init__()
        self.blocks = nn.ModuleList([Block(width), Block(width)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_readme_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = snippets()
    assert len(code) == 5, "a snippet was added or removed: check what it needs here"
    torch.manual_seed(0)
    namespace = {}
    for block in code[:3]:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["V"].shape[0] == 256 and namespace["A"].shape == (16, 256)

    gen = torch.Generator().manual_seed(0)
    tasks = [[(torch.randn(8, 16, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]
             for _ in range(2)]

    def your_accuracy(model, loader):
        with torch.no_grad():
            return sum((model(x).argmax(1) == y).float().mean().item() for x, y in loader) / len(loader)
    namespace.update(model=Tiny(), tasks=tasks, your_accuracy=your_accuracy)
    exec(compile(code[3], "README.md", "exec"), namespace)
    assert len(namespace["accuracy_matrix"]) == 2 and os.path.isfile(tmp_path / "run.safetensors")
    assert len(namespace["kl"].layers) == 4


def test_readme_trainer_snippet_runs(tmp_path):
    """The Hugging Face Trainer snippet, with a tiny LLaMA and two tiny tasks."""
    import pytest

    pytest.importorskip("transformers")
    from test_trainer_callback import task_data, tiny_llama, training_args

    code = [c for c in snippets() if "KeepLoRACallback" in c]
    assert len(code) == 1
    namespace = dict(model=tiny_llama(), args=training_args(tmp_path), task_1=task_data(0), task_2=task_data(1))
    exec(compile(code[0], "README.md", "exec"), namespace)
    assert namespace["kl"].task_index == 2 and os.path.isfile(tmp_path / "keeplora.safetensors")
