"""`kplora demo` (the README's main command) end to end on a reduced config."""
import json
import subprocess
import sys

import pytest

from kplora_kernels.cli import main

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
    assert "Transfer" in printed and "BWT" in printed and "data: sklearn digits" in printed
    report = json.loads((out / "results.json").read_text())
    assert set(report["methods"]) == {"keeplora++", "keeplora", "lora"}
    for result in report["methods"].values():
        assert len(result["accuracy"]) == 2 and len(result["accuracy"][0]) == 2
        assert all(0.0 <= a <= 1.0 for row in result["accuracy"] for a in row)
        assert set(result) >= {"transfer", "average", "last", "bwt", "base_accuracy", "base_retention"}
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 3
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the stage-0 model is cached: a second run loads it, and the run is deterministic
    assert main(args) == 0
    assert "loaded the pre-trained model" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert again["methods"] == report["methods"]


def test_demo_reads_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("stage0_steps: 5\ntask_steps: 2\nmax_tasks: 1\nwidth: 32\nrank: 2\nmethods: [lora]\n")
    assert main(["demo", "--config", str(path), "--output", str(tmp_path / "o"), "--cache-dir", str(tmp_path)]) == 0


@pytest.mark.parametrize("content,fragment", [
    ({"stage0_stpes": 3}, "unknown config keys"),
    ({"methods": ["ewc"]}, "methods"),
    ({"rank": 40, "width": 32}, "rank"),
    ({"width": 48}, "width"),
    ({"fashion": True}, "Fashion-MNIST not found"),
], ids=["typo", "method", "rank", "width", "fashion"])
def test_demo_user_errors_are_one_line(tmp_path, content, fragment):
    config = write_config(tmp_path, {**REDUCED, **content})
    proc = subprocess.run([sys.executable, "-m", "kplora_kernels", "demo", "--config", config,
                           "--output", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_demo_missing_config_file(tmp_path, capsys):
    assert main(["demo", "--config", str(tmp_path / "nope.json")]) == 2
    assert "config file not found" in capsys.readouterr().err
