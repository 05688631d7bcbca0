"""The README and the docs pages say what the code does: their Python snippets run as written (with a
tiny model and data for the names a snippet leaves to the reader), every `kplora` command line they
show parses, the README's table lists exactly the registered commands, and every relative link
points at a file that exists."""
import os
import re
import shlex

import pytest
import torch
from torch import nn

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
README = os.path.join(ROOT, "README.md")
USAGE = os.path.join(ROOT, "docs", "usage.md")
PAGES = [README] + sorted(os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                          if f.endswith(".md"))


def read(path) -> str:
    with open(path) as f:
        return f.read()


def snippets(path, language="python") -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", read(path), flags=re.S)


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.attn = nn.Module()
        self.attn.q_proj, self.attn.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return x + self.attn.out_proj(torch.tanh(self.attn.q_proj(x)))


class Tiny(nn.Module):
    """Names like open_clip's image tower (``visual.blocks.<i>.attn.q_proj``), so that ``preset("clip")``
    finds the targets and scales their layers."""

    def __init__(self, width=16, classes=3):
        super().__init__()
        self.visual = nn.Module()
        self.visual.blocks = nn.ModuleList([Block(width), Block(width)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for block in self.visual.blocks:
            x = block(x)
        return self.head(x)


def tiny_tasks():
    gen = torch.Generator().manual_seed(0)
    return [[(torch.randn(8, 16, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]
            for _ in range(2)]


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_readme_library_example_runs(tmp_path, monkeypatch):
    """The README's ten-line loop trains two tasks and grows the protected subspace."""
    monkeypatch.chdir(tmp_path)
    code = [c for c in snippets(README) if "KeepLoRACallback" not in c]
    assert len(code) == 1 and len(code[0].strip().splitlines()) <= 10, "the README's library example"
    torch.manual_seed(0)
    trained = []

    def train(model, loader, opt):
        for batch in loader:
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
        trained.append(len(loader))
    model = Tiny()
    namespace = dict(model=model, tasks=tiny_tasks(), loss_fn=loss_fn, train=train)
    exec(compile(code[0], "README.md", "exec"), namespace)
    kl = namespace["kl"]
    assert trained == [3, 3] and kl.task_index == 2 and len(kl.layers) == 4


def test_usage_snippets_run(tmp_path, monkeypatch):
    """docs/usage.md's functions, FusedKeepLoRALinear, streaming and controller snippets."""
    monkeypatch.chdir(tmp_path)
    code = [c for c in snippets(USAGE) if "KeepLoRACallback" not in c]
    assert len(code) == 4, "a snippet was added or removed: check what it needs here"
    torch.manual_seed(0)
    namespace = {}
    for block in code[:3]:
        exec(compile(block, "docs/usage.md", "exec"), namespace)
    assert namespace["V"].shape[0] == 256 and namespace["A"].shape == (16, 256)

    def your_accuracy(model, loader):
        with torch.no_grad():
            return sum((model(x).argmax(1) == y).float().mean().item() for x, y in loader) / len(loader)
    namespace.update(model=Tiny(), tasks=tiny_tasks(), your_accuracy=your_accuracy)
    exec(compile(code[3], "docs/usage.md", "exec"), namespace)
    assert len(namespace["accuracy_matrix"]) == 2 and os.path.isfile(tmp_path / "run.safetensors")
    assert len(namespace["kl"].layers) == 4


@pytest.mark.parametrize("page", [README, USAGE], ids=["README", "usage"])
def test_trainer_snippet_runs(tmp_path, page):
    """The Hugging Face Trainer snippet of each page, with a tiny LLaMA and two tiny tasks."""
    pytest.importorskip("transformers")
    from test_trainer_callback import task_data, tiny_llama, training_args

    code = [c for c in snippets(page) if "KeepLoRACallback" in c]
    assert len(code) == 1
    if page == README:
        assert len(code[0].strip().splitlines()) <= 5
    namespace = dict(model=tiny_llama(), args=training_args(tmp_path), task_1=task_data(0), task_2=task_data(1))
    exec(compile(code[0], os.path.basename(page), "exec"), namespace)
    assert namespace["kl"].task_index == 2 and os.path.isfile(tmp_path / "keeplora.safetensors")


def command_lines(path) -> list[list[str]]:
    """The arguments of every `kplora …` (or `torchrun … -m kplora_kernels …`) line of a bash block."""
    out = []
    for block in snippets(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("#")[0])
            if words[:1] == ["kplora"]:
                out.append(words[1:])
            elif "kplora_kernels" in words and words[0] in ("torchrun", "python", "python3"):
                out.append(words[words.index("kplora_kernels") + 1:])
    return out


def test_every_command_line_shown_parses():
    from kplora_kernels.cli import build_parser

    parser = build_parser()
    lines = [(os.path.basename(p), words) for p in PAGES for words in command_lines(p)]
    assert {words[0] for _, words in lines} >= {"demo", "mtil", "llava", "vlm", "memory", "kernels"}
    for page, words in lines:
        try:
            parser.parse_args(words)
        except SystemExit:
            pytest.fail(f"{page}: `kplora {' '.join(words)}` does not parse")


def test_readme_table_lists_the_registered_commands():
    from kplora_kernels.cli import COMMANDS

    table = re.findall(r"^\| `kplora (\w+)` \|", read(README), flags=re.M)
    assert sorted(table) == sorted(name for name, *_ in COMMANDS)


def test_commands_page_options_exist():
    """Every `--option` docs/commands.md names in a command's section is an option of that command."""
    from kplora_kernels.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    sections = re.split(r"^## kplora (\w+)\n", read(os.path.join(ROOT, "docs", "commands.md")), flags=re.M)
    checked = 0
    for name, text in zip(sections[1::2], sections[2::2]):
        known = set(subparsers[name]._option_string_actions)
        for option in re.findall(r"`(--[a-z][a-z-]*)", text):
            assert option in known, f"docs/commands.md, kplora {name}: {option} is not an option"
            checked += 1
    assert checked > 20


def test_relative_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", read(page)):
            assert os.path.exists(os.path.join(os.path.dirname(page), target)), f"{page}: {target}"


def test_readme_is_short():
    assert len(read(README).splitlines()) <= 120
