"""The README's main command, on a reduced run."""
import subprocess
import sys

import pytest

from kplora_kernels.cli import main


def test_demo_runs_and_protects_the_first_task(capsys):
    assert main(["demo", "--steps", "40"]) == 0
    out = capsys.readouterr().out
    assert "residual subspace" in out and "plain fine-tuning" in out


def test_demo_result_relations():
    from kplora_kernels.demo import run

    results = run(steps=60)
    residual = results["residual subspace"]
    # the residual-subspace update leaves the protected inputs' outputs (almost) unchanged
    assert residual["max_update_on_protected_inputs"] < 1e-4
    assert results["plain fine-tuning"]["max_update_on_protected_inputs"] > 1e-2
    assert residual["task1"] > 0.5  # it still learns the new task (chance is 0.2)


@pytest.mark.parametrize("args,fragment", [(["demo", "--steps", "0"], "--steps"),
                                           (["demo", "--eps-f", "1.5"], "--eps-f")])
def test_demo_rejects_bad_arguments(args, fragment):
    proc = subprocess.run([sys.executable, "-m", "kplora_kernels", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
