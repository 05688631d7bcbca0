"""No silent wrong result (round 3): each case written as a user hits it — a GradScaler overflow in
the AMP loop of adapter="full", a NaN adapter at end_task, a cast after wrapping, bf16 autocast, an
edited weight before a compact save, an incomplete checkpoint, an unwritable folder, a killed save."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from helpers import raises
from test_methods import MLP, config, make_task, task_loss

from kplora_kernels.continual import KeepLoRA


def _amp_step(kl, opt, scaler, batch):
    """The standard AMP loop: scale, backward, unscale, project (before clipping), clip, step, update."""
    opt.zero_grad()
    scaler.scale(task_loss(kl.model, batch)).backward()
    scaler.unscale_(opt)
    kl.project_gradients_()
    torch.nn.utils.clip_grad_norm_(kl.trainable_parameters(), 1e9)
    scaler.step(opt)
    scaler.update()


def test_a_step_skipped_by_gradscaler_leaves_the_next_one_projected_and_scaled():
    batch = make_task(0)

    def run(overflow_first: bool):
        kl = KeepLoRA(MLP(), config("keeplora++", "full"), progress=False)
        kl.begin_task([batch], task_loss)
        opt = torch.optim.SGD(kl.trainable_parameters(), lr=0.1)
        kl.register_projection_hook(opt)
        start = {n: layer.weight.detach().clone() for n, layer in kl.layers.items()}
        if overflow_first:  # an infinite scale overflows every gradient: GradScaler skips opt.step()
            overflowing = torch.amp.GradScaler("cpu", init_scale=float("inf"))
            _amp_step(kl, opt, overflowing, batch)
            for n, layer in kl.layers.items():
                assert torch.equal(layer.weight.detach(), start[n]), "a skipped step changed a weight"
        _amp_step(kl, opt, torch.amp.GradScaler("cpu", init_scale=8.0), batch)
        return {n: layer.weight.detach() - start[n] for n, layer in kl.layers.items()}, kl

    ref, kl = run(False)
    got, _ = run(True)
    first = next(iter(kl.layers))
    assert kl.layers[first].layer_scale < 1  # the scale s_l that a skipped projection would drop
    for n in ref:
        assert ref[n].abs().max() > 0, n
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-7)


def test_end_task_refuses_a_non_finite_adapter_and_changes_nothing():
    batch = make_task(0)
    kl = KeepLoRA(MLP(), config("keeplora++"), progress=False)
    kl.begin_task([batch], task_loss)
    name, layer = list(kl.layers.items())[1]
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_B[0, 0] = float("nan")
    weights = {n: lay.weight.detach().clone() for n, lay in kl.layers.items()}
    bases = {n: lay.V.clone() for n, lay in kl.layers.items()}
    with raises(FloatingPointError, name, "non-finite", "still open"):
        kl.end_task([batch], task_loss)
    assert kl.task_open and kl.task_index == 0 and kl._history == []
    for n, lay in kl.layers.items():
        assert torch.equal(lay.weight, weights[n]) and torch.equal(lay.V, bases[n]), n
    with torch.no_grad():  # the user repairs the adapter (e.g. from a checkpoint) and retries
        layer.lora_B.zero_()
    kl.end_task([batch], task_loss)
    assert not kl.task_open and kl.task_index == 1 and len(kl._history) == 1


def test_a_failing_data_pass_after_the_merge_is_retried_without_merging_twice():
    batch = make_task(0)
    kl = KeepLoRA(MLP(), config("keeplora++"), progress=False)
    kl.begin_task([batch], task_loss)
    with torch.no_grad():
        for layer in kl.layers.values():
            layer.lora_B.normal_(std=0.1)
    bad = (torch.full_like(batch[0], float("nan")), batch[1], batch[2])
    with pytest.raises(ValueError):
        kl.end_task([bad], task_loss)
    merged = {n: layer.weight.detach().clone() for n, layer in kl.layers.items()}
    assert kl.task_open and len(kl._history) == 1
    kl.end_task([batch], task_loss)
    assert len(kl._history) == 1 and kl.task_index == 1
    for n, layer in kl.layers.items():
        assert torch.equal(layer.weight, merged[n]), n  # merged once


def test_casting_the_model_after_wrapping_keeps_the_bases_in_their_dtype():
    batch = make_task(0)
    kl = KeepLoRA(MLP(), config("keeplora++"), progress=False)
    bases = {n: layer.V.clone() for n, layer in kl.layers.items()}
    kl.model.to(torch.bfloat16)
    for n, layer in kl.layers.items():
        assert layer.weight.dtype == torch.bfloat16
        assert layer.V.dtype == torch.float32 and torch.equal(layer.V, bases[n]), n
    bf16 = (batch[0].to(torch.bfloat16), batch[1], batch[2])
    kl.begin_task([bf16], task_loss)
    opt = torch.optim.SGD(kl.trainable_parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        task_loss(kl.model, bf16).backward()
        opt.step()
    kl.end_task([bf16], task_loss)  # the GPM step sees orthonormal fp32 bases
    assert kl.task_index == 1


def test_bf16_autocast_projects_the_gradient_in_the_bases_dtype():
    from helpers import random_basis
    from kplora_kernels.nn import FusedKeepLoRALinear

    torch.manual_seed(0)
    layer = FusedKeepLoRALinear(64, 48, rank=4, train_A=True)
    U, V = random_basis(48, 12, torch.float32, seed=1), random_basis(64, 16, torch.float32, seed=2)
    layer.set_bases(V=V, U=U)
    x = torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().pow(2).sum().backward()
    dB, dA = layer.lora_B.grad, layer.lora_A.grad
    assert dB.dtype == torch.float32 and dA.dtype == torch.float32
    eps = torch.finfo(torch.float32).eps
    # inside span(U) / span(V): fp32 rounding of the projection, not bf16's (≈ 4e-3)
    assert (U.T @ dB).norm() <= 64 * eps * dB.norm()
    assert (dA @ V).norm() <= 64 * eps * dA.norm()


def test_a_weight_edited_outside_the_library_is_not_lost_by_a_compact_save(tmp_path, caplog):
    batch = make_task(0)
    kl = KeepLoRA(MLP(), config("keeplora++"), progress=False)
    kl.begin_task([batch], task_loss)
    kl.end_task([batch], task_loss)
    kl.save(str(tmp_path / "clean.safetensors"), compact=True)  # untouched: compact is fine
    name, layer = next(iter(kl.layers.items()))
    with torch.no_grad():
        layer.weight.data[0, 0] += 0.5  # an edit through .data (no version bump)
    with raises(ValueError, "compact=True", name, "compact=False"):
        kl.save(str(tmp_path / "c.safetensors"), compact=True)
    kl.save(str(tmp_path / "auto.safetensors"))  # the default picks the form that keeps the edit
    assert "changed outside" in caplog.text
    fresh = KeepLoRA.from_checkpoint(MLP(), str(tmp_path / "auto.safetensors"), progress=False)
    assert torch.equal(fresh.layers[name].weight, layer.weight)


def test_loading_an_incomplete_checkpoint_names_the_missing_tensor(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    kl = KeepLoRA(MLP(), config("keeplora++"), progress=False)
    path = str(tmp_path / "ckpt.safetensors")
    kl.save(path, compact=False)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "layers.1.lora_B"}
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=meta)
    fresh = KeepLoRA(MLP(), config("keeplora++"), progress=False, compute_bases=False)
    before = {n: layer.weight.detach().clone() for n, layer in fresh.layers.items()}
    with raises(ValueError, "incomplete", "layers.1.lora_B", "nothing was loaded"):
        fresh.load(str(tmp_path / "cut.safetensors"))
    assert all(torch.equal(layer.weight, before[n]) for n, layer in fresh.layers.items())


def test_saving_where_nothing_can_be_written_is_a_clear_error():
    kl = KeepLoRA(MLP(), config("keeplora++"), progress=False)
    with raises(OSError, "cannot write the controller checkpoint", "/proc/kplora.safetensors"):
        kl.save("/proc/kplora.safetensors")  # /proc refuses new files, even to root


KILLED_SAVE = r"""
import os, signal, sys
sys.path.insert(0, {here!r})
import safetensors.torch
from test_methods import MLP, config
from kplora_kernels.continual import KeepLoRA

real = safetensors.torch.save_file
def dies_after_writing(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)  # the temp is complete on disk, then the process is killed
    os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = dies_after_writing
KeepLoRA(MLP(), config("keeplora++"), progress=False).save(sys.argv[1])
"""


def test_a_killed_save_leaves_a_temp_that_the_next_save_removes(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "killed.py"
    script.write_text(KILLED_SAVE.format(here=here))
    path = tmp_path / "ckpt.safetensors"
    proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here])})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leaked = [e for e in os.listdir(tmp_path) if ".kplora.tmp-" in e]
    assert len(leaked) == 1 and not path.exists()
    KeepLoRA(MLP(), config("keeplora++"), progress=False).save(str(path))
    assert path.exists() and not [e for e in os.listdir(tmp_path) if ".kplora.tmp-" in e]
