"""`kplora demo` (the README's main command) end to end on a reduced config."""
import dataclasses
import json
import subprocess
import sys

import pytest

from kplora_kernels.cli import main
from kplora_kernels.commands.demo import DemoConfig

REDUCED = {"stage0_steps": 20, "task_steps": 8, "batch_size": 32, "max_tasks": 2, "width": 32, "rank": 4}


def write_config(tmp_path, data, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_demo_end_to_end_writes_json_and_heatmaps(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["demo", "--config", write_config(tmp_path, REDUCED), "--output", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Transfer" in printed and "BWT" in printed and "data: sklearn digits only" in printed
    methods = DemoConfig().methods  # the default comparison: every method in one table
    assert f"{len(methods)} heatmaps (tasks and the base domain)" in printed
    report = json.loads((out / "results.json").read_text())
    assert set(report["methods"]) == set(methods) == {"keeplora++", "keeplora", "inflora", "olora", "lora"}
    for result in report["methods"].values():
        assert len(result["accuracy"]) == 2 and len(result["accuracy"][0]) == 2
        assert all(0.0 <= a <= 1.0 for row in result["accuracy"] for a in row)
        assert set(result) >= {"transfer", "average", "last", "bwt", "base_accuracy", "base_retention"}
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == len(methods)
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the stage-0 model is cached: a second run loads it, and the run is deterministic
    assert main(args) == 0
    assert "loaded the pre-trained model" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert again["methods"] == report["methods"]


def test_demo_reads_yaml(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("stage0_steps: 5\ntask_steps: 2\nmax_tasks: 1\nwidth: 32\nrank: 2\nmethods: [lora]\n")
    assert main(["demo", "--config", str(path), "--output", str(tmp_path / "o"), "--cache-dir", str(tmp_path)]) == 0
    assert "and 1 heatmap (" in capsys.readouterr().out


BAD_DEMO_CONFIGS = {  # id: (settings, a fragment of the one-line error)
    "typo": ({"stage0_stpes": 3}, "unknown config keys"),
    "method": ({"methods": ["ewc"]}, "methods"),
    "methods as a string": ({"methods": "lora"}, "methods must be a list of strings, got 'lora'"),
    "rank": ({"rank": 40, "width": 32}, "rank must be at most width/2"),
    "width": ({"width": 48}, "width must be a multiple of 32"),
    "rank as a string": ({"rank": "8"}, "rank must be an integer ≥ 1, got '8'"),
    "negative steps": ({"task_steps": -1}, "task_steps must be an integer ≥ 1, got -1"),
    "zero batch": ({"batch_size": 0}, "batch_size must be an integer ≥ 1, got 0"),
    "float count": ({"layers": 2.5}, "layers must be an integer ≥ 1, got 2.5"),
    "bool count": ({"layers": True}, "layers must be an integer ≥ 1, got True"),
    "lr as a string": ({"lr": "fast"}, "lr must be a number > 0, got 'fast'"),
    "negative lr": ({"stage0_lr": -1e-3}, "stage0_lr must be a number > 0"),
    "eps out of range": ({"eps_f": 1.5}, "eps_f must be a number in (0, 1], got 1.5"),
    "fashion as a string": ({"fashion": "yes"}, "fashion must be true or false, got 'yes'"),
    "max_tasks zero": ({"max_tasks": 0}, "max_tasks must be an integer ≥ 1 or null, got 0"),
    "seed negative": ({"seed": -1}, "seed must be an integer ≥ 0, got -1"),
    "fashion missing": ({"fashion": True, "fashion_root": "/nonexistent/fashion"}, "Fashion-MNIST not found"),
}


@pytest.mark.parametrize("case", list(BAD_DEMO_CONFIGS))
def test_demo_user_errors_are_one_line(tmp_path, capsys, case):
    content, fragment = BAD_DEMO_CONFIGS[case]
    config = write_config(tmp_path, {**REDUCED, **content})
    assert main(["demo", "--config", config, "--output", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err


def test_a_user_error_has_no_traceback_and_exit_status_2(tmp_path):
    config = write_config(tmp_path, {**REDUCED, "task_steps": "many"})
    proc = subprocess.run([sys.executable, "-m", "kplora_kernels", "demo", "--config", config,
                           "--output", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "kplora: error: " + f"{config}: task_steps must be an integer ≥ 1, got 'many'"


def test_demo_missing_config_file(tmp_path, capsys):
    assert main(["demo", "--config", str(tmp_path / "nope.json")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_bad_yaml_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("rank: [1,\n  2\nwidth: 3\n")
    assert main(["demo", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cannot parse" in err and len(err.strip().splitlines()) == 1


def write_fashion(root, n=120):
    """A miniature Fashion-MNIST in the Debian package's layout (gzipped idx files)."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir()
    images = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for name, array in (("train-images-idx3-ubyte.gz", images), ("train-labels-idx1-ubyte.gz", labels)):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        with gzip.open(root / name, "wb") as f:
            f.write(header + array.tobytes())


def test_demo_data_do_not_depend_on_what_is_installed(tmp_path):
    from kplora_kernels.data.demo_tasks import build_domains

    _, tasks, source = build_domains(0)  # the default: digits only, whether Fashion-MNIST is installed or not
    assert [t.name for t in tasks] == ["parity", "magnitude", "loops", "mirror"] and "digits only" in source
    write_fashion(tmp_path / "fashion")
    _, tasks, source = build_domains(0, True, str(tmp_path / "fashion"))
    assert [t.name for t in tasks] == ["parity", "magnitude", "loops", "footwear", "tops"]
    assert str(tmp_path / "fashion") in source
    footwear = tasks[3]
    assert footwear.class_names == ["sandal", "sneaker", "ankle boot"]
    assert len(footwear.y_train) + len(footwear.y_test) == 36  # labels 5, 7, 9 of 120 images
    assert footwear.x_train.shape[1:] == (1, 8, 8) and set(footwear.y_train.tolist()) <= {0, 1, 2}


def test_help_lists_every_config_key_and_version(capsys):
    from kplora_kernels import __version__
    from kplora_kernels.commands.demo import DemoConfig
    from kplora_kernels.commands.llava import LLaVAConfig
    from kplora_kernels.commands.mtil import MTILConfig

    for command, cls in (("demo", DemoConfig), ("mtil", MTILConfig), ("llava", LLaVAConfig)):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        for f in dataclasses.fields(cls):
            assert f"  {f.name} = " in text, (command, f.name)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"kplora {__version__}"


def test_stage0_cache_key_follows_settings_and_code(tmp_path, monkeypatch):
    """A stage 0 cached by another version of the demo's code is not reused silently."""
    from kplora_kernels.commands import demo

    source = tmp_path / "code.py"
    source.write_text("x = 1\n")
    monkeypatch.setattr(demo, "_stage0_sources", lambda: [str(source)])
    cfg = DemoConfig()
    key = demo.stage0_key(cfg)
    assert demo.stage0_key(DemoConfig()) == key
    assert demo.stage0_key(dataclasses.replace(cfg, seed=cfg.seed + 1)) != key
    source.write_text("x = 2\n")
    assert demo.stage0_key(cfg) != key
