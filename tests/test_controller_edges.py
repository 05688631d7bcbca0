"""The controller's edges (issue 14): the task lifecycle as a state machine, empty loaders, atomic
saves after a crash, shared input sketches only for layers that really read one tensor, and the
bad-input contract of the config, the controller and the metrics."""
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from helpers import raises
from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig, metrics
from kplora_kernels.subspace import gpm_expand
from test_methods import MLP, config, make_task, task_loss, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the lifecycle ---------------------------------------------------------------------------------

def test_lifecycle_is_a_state_machine():
    kl = KeepLoRA(MLP(), config("keeplora++"), progress=False)
    batch = make_task(0)
    V0 = {n: layer.V.clone() for n, layer in kl.layers.items()}
    with raises(RuntimeError, "end_task", "no task is open", "begin_task first"):
        kl.end_task([batch], task_loss)
    assert kl.task_index == 0 and all(torch.equal(layer.V, V0[n]) for n, layer in kl.layers.items())
    kl.begin_task([batch], task_loss)
    train(kl, batch, steps=3)
    B = {n: layer.lora_B.detach().clone() for n, layer in kl.layers.items()}
    with raises(RuntimeError, "begin_task", "task 0 is still open", "end_task first"):
        kl.begin_task([batch], task_loss)
    assert all(torch.equal(layer.lora_B, B[n]) for n, layer in kl.layers.items())  # training kept
    kl.end_task([batch], task_loss)
    assert kl.task_index == 1 and not kl.task_open
    with raises(RuntimeError, "no task is open"):
        kl.end_task([batch], task_loss)
    assert kl.task_index == 1


def _no_batches():
    return iter(())


@pytest.mark.parametrize("method", ["keeplora++", "inflora", "lora"])
def test_empty_loaders_are_refused_in_both_passes(method):
    kl = KeepLoRA(MLP(), config(method), progress=False)
    batch = make_task(0)
    with raises(ValueError, "begin_task", "empty", "len(loader) == 0"):
        kl.begin_task([], task_loss)
    if method != "lora":  # lora reads no batch at a task start: an iterator without len() is not read
        with raises(ValueError, "no batch"):
            kl.begin_task(_no_batches(), task_loss)
    assert not kl.task_open and kl.task_index == 0
    kl.begin_task([batch], task_loss)
    with raises(ValueError, "end_task", "empty"):
        kl.end_task([], task_loss)
    assert kl.task_open and kl.task_index == 0  # still open: end_task may be retried
    if method != "lora":
        W = {n: layer.weight.detach().clone() for n, layer in kl.layers.items()}
        with raises(ValueError, "no batch"):
            kl.end_task(_no_batches(), task_loss)
        assert kl.task_open
        kl.end_task([batch], task_loss)  # the retry merges nothing twice (B is already zero)
        assert all(torch.equal(layer.weight, W[n]) for n, layer in kl.layers.items())
    else:
        kl.end_task([batch], task_loss)
    assert not kl.task_open and kl.task_index == 1


def test_lifecycle_argument_errors():
    kl = KeepLoRA(MLP(), config("keeplora"), progress=False)
    with raises(TypeError, "loader must be an iterable", "int"):
        kl.begin_task(3, task_loss)
    with raises(TypeError, "loss_fn must be callable"):
        kl.begin_task([make_task(0)], "loss")
    with raises(ValueError, "fraction", "'0.5'"):
        kl.begin_task([make_task(0)], task_loss, fraction="0.5")
    with raises(ValueError, "fraction", "0"):
        kl.begin_task([make_task(0)], task_loss, fraction=0)
    with raises(TypeError, "model must be an nn.Module"):
        KeepLoRA("model", config("keeplora"))
    with raises(TypeError, "config must be a KeepLoRAConfig", "dict"):
        KeepLoRA(MLP(), {"rank": 4})


# --- saving ----------------------------------------------------------------------------------------

def test_save_into_a_missing_directory_names_the_path(tmp_path):
    kl = KeepLoRA(MLP(), config("keeplora"), progress=False)
    path = tmp_path / "nowhere" / "kl.safetensors"
    with raises(FileNotFoundError, "save", str(path), "does not exist"):
        kl.save(path)
    with raises(TypeError, "path must be a str"):
        kl.save(3)


def test_a_crash_during_save_leaves_a_temp_file_that_the_next_save_removes(tmp_path, monkeypatch):
    path = tmp_path / "kl.safetensors"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
        from test_methods import MLP, config
        from kplora_kernels.continual import KeepLoRA
        kl = KeepLoRA(MLP(), config("keeplora"), progress=False)
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # die between write and rename
        kl.save({str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    leaked = [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    assert len(leaked) == 1 and leaked[0].startswith(".kl.safetensors.kplora.tmp-"), leaked
    assert os.path.getsize(tmp_path / leaked[0]) > 0 and not path.exists()
    # a temp file of a live writer (here: this test's parent process) is not touched
    live = tmp_path / f".kl.safetensors.kplora.tmp-{os.getppid()}-abcd"
    live.write_bytes(b"x")
    other = tmp_path / ".other.safetensors.kplora.tmp-1-abcd"  # another checkpoint's: not ours to remove
    other.write_bytes(b"x")
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    kl = KeepLoRA(MLP(), config("keeplora"), progress=False)
    kl.save(path)
    assert sorted(os.listdir(tmp_path)) == sorted(["kl.safetensors", live.name, other.name])
    assert synced == [False, True]  # the file, then the directory after the rename
    KeepLoRA.from_checkpoint(MLP(), str(path), progress=False)


# --- shared input sketches only for layers that read one tensor -------------------------------------

class CrossAttention(nn.Module):
    """A decoder block's cross-attention: q reads the decoder states, k and v the encoder output."""

    def __init__(self, dim=16):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, dec, enc):
        q, k, v = self.q_proj(dec), self.k_proj(enc), self.v_proj(enc)
        att = torch.softmax(q @ k.mT / 4.0, dim=-1)
        return self.out_proj(att @ v)


class CrossModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([CrossAttention()])

    def forward(self, dec, enc):
        return self.layers[0](dec, enc)


def _low_rank_inputs(stream, seed, rank, n=4, tokens=12, dim=16):
    """Batch ``seed`` of an input stream living in its own ``rank``-dimensional subspace."""
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=torch.Generator().manual_seed(stream)))[0]
    return torch.randn(n, tokens, rank, generator=torch.Generator().manual_seed(1000 * stream + seed)) @ basis.T


def _forward(model, batch):
    return model(*batch)


def test_cross_attention_bases_grow_from_each_layers_own_inputs():
    model = CrossModel()
    cfg = KeepLoRAConfig(method="keeplora", rank=2, eps_w={"default": 0.2}, eps_f=0.9,
                         targets=[r"\.(q_proj|k_proj|v_proj|out_proj)$"])
    kl = KeepLoRA(model, cfg, progress=False)
    batches = [(_low_rank_inputs(1, s, 3), _low_rank_inputs(2, s, 4)) for s in range(3)]
    sketches = kl.collect_inputs(batches, _forward, 1.0, "test")
    names = {n.rsplit(".", 1)[1]: n for n in kl.layers}
    assert sketches[names["k_proj"]] is sketches[names["v_proj"]]  # the same encoder tensor
    assert sketches[names["q_proj"]] is not sketches[names["k_proj"]]  # the decoder states
    assert sketches[names["out_proj"]] is not sketches[names["q_proj"]]

    before = {n: layer.V.clone() for n, layer in kl.layers.items()}
    inputs = {names["q_proj"]: torch.cat([b[0] for b in batches]), names["k_proj"]: torch.cat([b[1] for b in batches]),
              names["v_proj"]: torch.cat([b[1] for b in batches])}
    kl.begin_task(batches, lambda m, b: m(*b).pow(2).mean())
    kl.end_task(batches, _forward)
    for name, X in inputs.items():
        exact = gpm_expand(before[name].double(), X.double(), cfg.eps_f)
        V = kl.layers[name].V.double()
        captured = lambda B: (X.double() @ B).pow(2).sum() / X.double().pow(2).sum()  # noqa: E731
        assert captured(V) >= cfg.eps_f, name
        # the same energy and the same subspace as the exact GPM on this layer's own inputs
        assert abs(captured(V) - captured(exact)) < 1e-5, name
        torch.testing.assert_close(V @ V.T, exact @ exact.T, atol=1e-4, rtol=0)


def test_self_attention_layers_share_one_sketch_and_diverging_inputs_raise():
    model = CrossModel()
    kl = KeepLoRA(model, KeepLoRAConfig(method="keeplora", rank=2, targets=[r"\.(q|k|v)_proj$"]), progress=False)
    x = _low_rank_inputs(1, 0, 3)
    y = x + 1
    sketches = kl.collect_inputs([(x, x), (y, y)], _forward, 1.0, "test")
    assert len({id(s) for s in sketches.values()}) == 1
    assert next(iter(sketches.values())).tokens == 2 * x.shape[0] * x.shape[1]  # counted once, not thrice
    with raises(RuntimeError, "k_proj", "batch 2", "cannot be shared"):
        kl.collect_inputs([(x, x), (x, x + 1)], _forward, 1.0, "test")
    assert all(layer.input_accumulator is None for layer in kl.layers.values())


@pytest.mark.parametrize("method,decompositions", [("inflora", 1), ("keeplora", 3)])
def test_a_shared_covariance_is_decomposed_once_where_the_bases_are_equal(method, decompositions, monkeypatch):
    """q, k, v of a self-attention share one exact sketch; where their bases are equal too (InfLoRA
    protects no pre-trained subspace, so they start and grow alike) the GPM expansion is computed
    once and the three get the same basis; KeepLoRA's differ (each weight's principal subspace)."""
    from kplora_kernels.subspace import InputSketch

    model = CrossModel()
    kl = KeepLoRA(model, KeepLoRAConfig(method=method, rank=2, eps_w={"default": 0.2}, eps_f=0.9,
                                        targets=[r"\.(q|k|v)_proj$"]), progress=False)
    calls = []
    expand = InputSketch.expand
    monkeypatch.setattr(InputSketch, "expand", lambda self, *a, **k: calls.append(1) or expand(self, *a, **k))
    batches = [(x, x) for x in (_low_rank_inputs(1, s, 3) for s in range(3))]
    for _ in range(2):  # the second task starts from the grown (equal) bases
        calls.clear()
        kl.begin_task(batches, lambda m, b: m(*b).pow(2).mean())
        kl.end_task(batches, _forward)
        assert len(calls) == decompositions
    Vs = [layer.V for layer in kl.layers.values()]
    if method == "inflora":
        assert Vs[0].shape[1] > 0 and all(torch.equal(V, Vs[0]) for V in Vs)
        assert len({V.data_ptr() for V in Vs}) == 3  # equal values, separate storage
    X = torch.cat([b[0] for b in batches]).double()
    for V in Vs:  # every basis holds the GPM share of the inputs
        assert (X @ V.double()).pow(2).sum() / X.pow(2).sum() >= 0.9


@pytest.mark.parametrize("residual_energy,exact", [("auto", True), ("estimate", False), ("exact", True)])
def test_residual_energy_choice_reaches_the_randomized_input_sketches(residual_energy, exact):
    """A budget too small for the 16² covariance makes every input sketch randomized (width 8); the
    config's choice decides whether its residual energy is exact (the bases here have ≤ 8 columns)."""
    model = CrossModel()
    cfg = KeepLoRAConfig(method="keeplora", rank=2, eps_w={"default": 0.2}, targets=[r"\.(q|k)_proj$"],
                         sketch_memory_budget=4 * 16 * 8, residual_energy=residual_energy)
    kl = KeepLoRA(model, cfg, progress=False)
    batches = [(_low_rank_inputs(1, s, 3), _low_rank_inputs(2, s, 4)) for s in range(2)]
    sketches = kl.collect_inputs(batches, _forward, 1.0, "test")
    assert all(s.strategy == "randomized" and s.width == 8 for s in sketches.values())
    assert all(layer.V.shape[1] <= 8 for layer in kl.layers.values())
    assert all(s.exact_residual == exact for s in sketches.values())
    kl.begin_task(batches, lambda m, b: m(*b).pow(2).mean())
    kl.end_task(batches, _forward)  # the whole boundary runs with the choice


# --- the bad-input contract of the config and the metrics -------------------------------------------

@pytest.mark.parametrize("kwargs,exc,fragments", [
    ({"targets": r"layers\.\d+$"}, TypeError, ["targets", "list of regular expressions", "str"]),
    ({"targets": [r"layers\.(\d+$"]}, ValueError, ["targets[0]", "not a valid regular expression"]),
    ({"targets": []}, ValueError, ["targets"]),
    ({"targets": [3]}, TypeError, ["targets[0]", "int"]),
    ({"extra_trainable": "proj"}, TypeError, ["extra_trainable", "str"]),
    ({"layer_scaling_towers": "visual"}, TypeError, ["layer_scaling_towers"]),
    ({"eps_w": "0.5"}, TypeError, ["eps_w", "str", "'0.5'"]),
    ({"eps_w": {"default": "0.5"}}, TypeError, ["eps_w['default']", "str"]),
    ({"eps_w": 1.5}, ValueError, ["eps_w['default']", "(0, 1]", "1.5"]),
    ({"eps_f": "0.99"}, TypeError, ["eps_f", "str"]),
    ({"eps_f": float("nan")}, ValueError, ["eps_f", "finite"]),
    ({"eps_w_out": 0.0}, ValueError, ["eps_w_out", "(0, 1]"]),
    ({"rank": 0}, ValueError, ["rank", "≥ 1", "0"]),
    ({"rank": -3}, ValueError, ["rank", "-3"]),
    ({"rank": 2.5}, TypeError, ["rank", "int", "2.5"]),
    ({"rank": True}, TypeError, ["rank", "bool"]),
    ({"sketch_memory_budget": 0}, ValueError, ["sketch_memory_budget"]),
    ({"seed": "1"}, TypeError, ["seed"]),
    ({"alpha": -1.0}, ValueError, ["alpha", "> 0"]),
    ({"gamma": 0.0}, ValueError, ["gamma", "(0, 1]"]),
    ({"schedule": "step"}, ValueError, ["schedule", "linear"]),
    ({"method": None}, ValueError, ["method", "None"]),
    ({"adapter": "qlora"}, ValueError, ["adapter", "'qlora'"]),
    ({"residual_energy": "sometimes"}, ValueError, ["residual_energy", "'exact'", "'sometimes'"]),
    ({"olora_lambda1": -0.5}, ValueError, ["olora_lambda1", "≥ 0"]),
    ({"olora_lambda1": 1.0}, ValueError, ["olora_lambda1", "method='olora' only", "keeplora++"]),
    ({"method": "lora", "eps_w_out": 0.5}, ValueError, ["eps_w_out", "keeplora++/keeplora only", "'lora'"]),
    ({"basis_dtype": "int8"}, ValueError, ["basis_dtype"]),
])
def test_config_is_validated_on_construction(kwargs, exc, fragments):
    with raises(exc, *fragments):
        KeepLoRAConfig(**kwargs)


def test_config_from_dict_validates_too():
    with raises(TypeError, "data must be a dict"):
        KeepLoRAConfig.from_dict([("rank", 4)])
    with raises(TypeError, "eps_w"):
        KeepLoRAConfig.from_dict({"eps_w": "0.5"})
    assert KeepLoRAConfig.from_dict(KeepLoRAConfig(eps_w=0.4).to_dict()).eps_w == {"default": 0.4}


@pytest.mark.parametrize("acc,fragments", [
    ([[0.9, 0.1], [0.8]], ["acc", "row 1 has 1 entries, expected 2"]),
    ([[0.9, 0.1, 0.3], [0.8, 0.7, 0.2]], ["acc", "row 0 has 3 entries, expected 2"]),
    ([0.9, 0.8], ["acc", "row 0", "float"]),
    ([["a"]], ["acc", "numbers"]),
    ([[1.0, 2.0]], ["square"]),
])
def test_metrics_refuse_ragged_or_non_square_matrices(acc, fragments):
    for fn in (metrics.transfer, metrics.average, metrics.last, metrics.bwt, metrics.summary):
        with raises(ValueError, *fragments):
            fn(acc)
