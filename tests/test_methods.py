"""Every continual-learning method through the one engine (peft's TEST_CASES pattern): wrapping keeps
outputs, one task trains, each method's invariant holds, checkpoints resume exactly; plain LoRA is
peft's LoRA; residual-subspace full fine-tuning (``adapter="full"``)."""

import pytest
import torch
from torch import nn

from helpers import raises
from kplora_kernels.continual import FULL_METHODS, METHODS, REGISTRY, KeepLoRA, KeepLoRAConfig, olora_penalty
from kplora_kernels.subspace.sketch import complement_basis

IN, HID, TASK_DIM = 16, 24, 5
FP32_EPS = torch.finfo(torch.float32).eps  # the bases are stored in fp32 (basis_dtype="fp32")


class MLP(nn.Module):
    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([nn.Linear(IN, HID), nn.Linear(HID, HID), nn.Linear(HID, 9)]).to(dtype)

    def forward(self, x):
        h = torch.tanh(self.layers[0](x))
        return self.layers[2](torch.tanh(self.layers[1](h)))


def make_task(t, n=64, dtype=torch.float32):
    """Task t: inputs in a TASK_DIM-dimensional subspace of its own, 3 classes by a random teacher."""
    gen = torch.Generator().manual_seed(1000 + t)
    basis = torch.linalg.qr(torch.randn(IN, TASK_DIM, generator=gen, dtype=torch.float64))[0]
    z = torch.randn(n, TASK_DIM, generator=gen, dtype=torch.float64)
    x = (z @ basis.T).to(dtype)
    y = (z @ torch.randn(TASK_DIM, 3, generator=gen, dtype=torch.float64)).argmax(1)
    return x, y, t


def task_loss(model, batch):
    x, y, t = batch
    return nn.functional.cross_entropy(model(x)[:, 3 * t:3 * t + 3], y)


def config(method, adapter="lora", **overrides):
    base = dict(method=method, adapter=adapter, rank=4, alpha=8.0, eps_w={"default": 0.5}, eps_f=0.95,
                targets=[r"layers\.\d+$"])
    base.update(overrides)
    return KeepLoRAConfig(**base)


TEST_CASES = [(m, "lora") for m in METHODS] + [(m, "full") for m in FULL_METHODS]
IDS = [f"{m}-{a}" for m, a in TEST_CASES]


def protected(layer):
    """The protected input basis (``in×k_in``), whichever way the layer stores it."""
    return complement_basis(layer.V.double()) if layer.V_complement else layer.V.double()


def train(kl, batch, steps=8, lr=1e-2, post_step=True):
    opt = torch.optim.AdamW(kl.trainable_parameters(), lr=lr, weight_decay=0.0)
    handle = kl.register_projection_hook(opt) if post_step else None
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = task_loss(kl.model, batch) + kl.regularization()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if handle is not None:
        handle.remove()
    return losses


def run_tasks(kl, tasks, steps=8):
    for batch in tasks:
        kl.begin_task([batch], task_loss)
        train(kl, batch, steps)
        kl.end_task([batch], task_loss)


def test_registry_covers_every_method_and_names_it():
    assert tuple(REGISTRY) == METHODS
    assert all(REGISTRY[m].supports_full for m in FULL_METHODS)
    assert not any(REGISTRY[m].supports_full for m in set(METHODS) - set(FULL_METHODS))
    with raises(ValueError, "adapter='full'", "inflora"):
        config("inflora", "full")


@pytest.mark.parametrize("method,adapter", TEST_CASES, ids=IDS)
def test_wrap_leaves_outputs_unchanged(method, adapter):
    model = MLP()
    x = make_task(0)[0]
    ref = model(x)
    kl = KeepLoRA(model, config(method, adapter), progress=False)
    torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-6)
    kl.begin_task([make_task(0)], task_loss)  # B = 0 at a task start: still the same function
    torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method,adapter", TEST_CASES, ids=IDS)
def test_one_task_trains(method, adapter):
    model = MLP()
    kl = KeepLoRA(model, config(method, adapter), progress=False)
    batch = make_task(0)
    before = {n: layer.weight.detach().clone() for n, layer in kl.layers.items()}
    kl.begin_task([batch], task_loss)
    trainable = kl.trainable_parameters()
    assert trainable and all(p.requires_grad for p in trainable)
    trains_A = any(p is layer.lora_A for p in trainable for layer in kl.layers.values())
    assert trains_A == (adapter == "lora" and REGISTRY[method].trains_A)
    losses = train(kl, batch, steps=15)
    assert losses[-1] < losses[0] - 0.05, losses
    kl.end_task([batch], task_loss)
    assert kl.task_index == 1 and not kl.task_open
    # the trainable set is fixed at wrap time (DDP and the Trainer see it); between tasks nothing has a gradient
    assert all(layer.weight.requires_grad == (adapter == "full") and layer.weight.grad is None
               for layer in kl.layers.values())
    assert any((layer.weight - before[n]).abs().max() > 1e-4 for n, layer in kl.layers.items())
    if adapter == "lora":  # merged: the adapters are zero again
        assert all(torch.count_nonzero(layer.lora_B) == 0 for layer in kl.layers.values())


@pytest.mark.parametrize("method,adapter", TEST_CASES, ids=IDS)
def test_method_invariant(method, adapter):
    """keeplora(++)/inflora (and their full mode): the second task's update is zero on the protected
    inputs (old inputs give the same layer outputs); inflora: A ⟂ the protected subspace; lora-fa:
    A frozen; lora/olora: both factors move; olora: the penalty is the formula on the recorded A's."""
    model = MLP(torch.float64)
    kl = KeepLoRA(model, config(method, adapter), progress=False)
    t0, t1 = make_task(0, dtype=torch.float64), make_task(1, dtype=torch.float64)
    run_tasks(kl, [t0])
    bases = {n: protected(layer) for n, layer in kl.layers.items()}
    weights = {n: layer.weight.detach().clone() for n, layer in kl.layers.items()}
    kl.begin_task([t1], task_loss)
    A0 = {n: layer.lora_A.detach().clone() for n, layer in kl.layers.items()}
    if method == "inflora":
        for n, layer in kl.layers.items():
            assert bases[n].shape[1] > 0, n  # the first task's inputs are protected
            leak = (layer.lora_A.double() @ bases[n]).norm() / layer.lora_A.norm()
            assert leak < 8 * FP32_EPS, (n, leak.item())
    if method == "olora":
        expected = sum(0.5 * (kl.method.previous[n].double() @ layer.lora_A.mT).pow(2).sum()
                       for n, layer in kl.layers.items())
        assert kl.method.previous["layers.0"].shape == (4, IN)
        torch.testing.assert_close(kl.regularization(), expected, rtol=1e-12, atol=0)
        assert kl.regularization() > 0  # peft's random A is not orthogonal to the last one
    losses = train(kl, t1)
    assert losses[-1] < losses[0]
    if method == "lora-fa":
        assert all(torch.equal(layer.lora_A, A0[n]) for n, layer in kl.layers.items())
    if method in ("lora", "olora") and adapter == "lora":
        assert all(not torch.equal(layer.lora_A, A0[n]) for n, layer in kl.layers.items())
    kl.end_task([t1], task_loss)
    if REGISTRY[method].grows_input_basis:
        for n, layer in kl.layers.items():
            delta = layer.weight.detach() - weights[n]
            assert delta.abs().max() > 1e-6, n
            # fp64 weights, fp32-stored bases (orthonormal to ~1e-7): the update vanishes on old inputs
            # to a few fp32 ulp of the basis (measured ≈2e-8 relative)
            assert (delta @ bases[n]).abs().max() <= 8 * FP32_EPS * delta.abs().max(), n


def test_olora_penalty_gradient_by_autograd_check():
    gen = torch.Generator().manual_seed(0)
    prev = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    A = torch.randn(3, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: olora_penalty(prev, a, b, 0.5, 0.1), (A, B))
    # and against the closed form: d/dA λ1‖P Aᵀ‖² = 2 λ1 A PᵀP, d/dA λ2‖A‖² = 2 λ2 A
    loss = olora_penalty(prev, A, B, 0.5, 0.1)
    gA, gB = torch.autograd.grad(loss, (A, B))
    torch.testing.assert_close(gA, 2 * 0.5 * A.detach() @ prev.T @ prev + 2 * 0.1 * A.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(gB, 2 * 0.1 * B.detach(), rtol=1e-12, atol=0)
    assert olora_penalty(None, A, B, 0.5, 0.0).item() == 0.0


@pytest.mark.parametrize("method,adapter", TEST_CASES, ids=IDS)
def test_checkpoints_resume_exactly(method, adapter, tmp_path):
    tasks = [make_task(t) for t in range(3)]
    kl_full = KeepLoRA(MLP(), config(method, adapter), progress=False)
    torch.manual_seed(5)
    run_tasks(kl_full, tasks)

    kl = KeepLoRA(MLP(), config(method, adapter), progress=False)
    torch.manual_seed(5)
    run_tasks(kl, tasks[:1])
    path = tmp_path / "a.safetensors"
    kl.save(path)
    resumed = KeepLoRA.from_checkpoint(MLP(), str(path), progress=False)
    # a save in the middle of a task (after its start) resumes too
    resumed.begin_task([tasks[1]], task_loss)
    resumed.save(path)
    resumed = KeepLoRA.from_checkpoint(MLP(), str(path), progress=False)
    assert resumed.task_open and resumed.task_index == 1
    train(resumed, tasks[1])
    resumed.end_task([tasks[1]], task_loss)
    run_tasks(resumed, tasks[2:])
    for name, layer in kl_full.layers.items():
        other = resumed.layers[name]
        for key in ("weight", "V", "U", "lora_A", "lora_B"):
            assert torch.equal(getattr(layer, key), getattr(other, key)), (name, key)
    for key, t in kl_full.method.state_tensors().items():
        assert torch.equal(t, resumed.method.state_tensors()[key]), key


def test_lora_is_peft_lora():
    """Same tiny model, data and seed: the same A, B and outputs after AdamW steps as peft's LoraModel."""
    from peft import LoraConfig, get_peft_model

    batch = make_task(0, dtype=torch.float64)
    ours = MLP(torch.float64)
    kl = KeepLoRA(ours, config("lora", seed=3), progress=False)
    kl.begin_task([batch], task_loss)
    theirs = MLP(torch.float64)
    torch.manual_seed(3)
    peft_model = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0,
                                                   target_modules=["layers.0", "layers.1", "layers.2"]))
    peft_layers = {f"layers.{i}": theirs.layers[i] for i in range(3)}
    for name, layer in kl.layers.items():
        assert torch.equal(layer.lora_A, peft_layers[name].lora_A["default"].weight), name
        assert torch.equal(layer.lora_B, peft_layers[name].lora_B["default"].weight), name
        assert layer.scaling == peft_layers[name].scaling["default"]
    opt_ours = torch.optim.AdamW(kl.trainable_parameters(), lr=1e-2)
    opt_theirs = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    assert len(opt_ours.param_groups[0]["params"]) == len(opt_theirs.param_groups[0]["params"]) == 6
    for _ in range(5):
        for model, opt in ((ours, opt_ours), (peft_model, opt_theirs)):
            opt.zero_grad()
            task_loss(model, batch).backward()
            opt.step()
    # fp64 on both sides: the only difference is the order of the adapter branch's additions
    for name, layer in kl.layers.items():
        torch.testing.assert_close(layer.lora_A, peft_layers[name].lora_A["default"].weight, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.lora_B, peft_layers[name].lora_B["default"].weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours(batch[0]), peft_model(batch[0]), rtol=1e-10, atol=1e-12)
    kl.end_task([batch], task_loss)  # merged into the weight, as peft's merge_and_unload
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(ours(batch[0]), merged(batch[0]), rtol=1e-10, atol=1e-12)


# --- residual-subspace full fine-tuning (adapter="full") -------------------------------------------

def full_config(method="keeplora++", **overrides):
    return config(method, "full", eps_w_out=0.5, **overrides)


@pytest.mark.parametrize("restore", [True, False], ids=["with-restore", "without-restore"])
def test_full_mode_keeps_old_inputs_and_output_side(restore):
    model = MLP()
    kl = KeepLoRA(model, full_config(), progress=False)
    batch = make_task(0)
    W0 = {n: layer.weight.detach().clone() for n, layer in kl.layers.items()}
    kl.begin_task([batch], task_loss)
    assert all(layer.weight.requires_grad and layer.merged for layer in kl.layers.values())
    opt = torch.optim.AdamW(kl.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    if restore:
        kl.register_projection_hook(opt)
    else:  # only the gradient projection: Adam's element-wise scaling leaves the subspace
        opt.register_step_pre_hook(lambda *_: kl.adapter.project_gradients_(kl))
    for _ in range(10):
        opt.zero_grad()
        task_loss(model, batch).backward()
        opt.step()
    worst_in, worst_out = 0.0, 0.0
    for n, layer in kl.layers.items():
        V, U = protected(layer).float(), layer.U.float()
        assert V.shape[1] > 0 and U.shape[1] > 0, n
        delta = layer.weight.detach() - W0[n]
        assert delta.abs().max() > 1e-3, n
        x_old = torch.randn(7, V.shape[1]) @ V.T  # old inputs: in span(V)
        out_change = (x_old @ layer.weight.detach().T - x_old @ W0[n].T).abs().max()
        worst_in = max(worst_in, (out_change / (x_old @ W0[n].T).abs().max()).item())
        worst_out = max(worst_out, ((U.T @ delta).abs().max() / delta.abs().max()).item())
    if restore:  # fp32 rounding of a 24-wide product: a few ulp
        assert worst_in < 1e-5 and worst_out < 1e-5, (worst_in, worst_out)
    else:
        assert worst_in > 1e-3 and worst_out > 1e-2, (worst_in, worst_out)


def test_full_mode_gradient_is_the_scaled_projection():
    model = MLP(torch.float64)
    kl = KeepLoRA(model, full_config(), progress=False)
    batch = make_task(0, dtype=torch.float64)
    kl.begin_task([batch], task_loss)
    task_loss(model, batch).backward()
    raw = {n: layer.weight.grad.clone() for n, layer in kl.layers.items()}
    kl.project_gradients_()
    kl.project_gradients_()  # once per step: a second call changes nothing
    for n, layer in kl.layers.items():
        V, U = protected(layer), layer.U.double()
        P_in, P_out = torch.eye(V.shape[0], dtype=V.dtype) - V @ V.T, torch.eye(U.shape[0], dtype=U.dtype) - U @ U.T
        torch.testing.assert_close(layer.weight.grad, layer.layer_scale * P_out @ raw[n] @ P_in, rtol=1e-10, atol=1e-12)
    assert len({layer.layer_scale for layer in kl.layers.values()}) == 3  # keeplora++: s_l differs per layer


def test_full_mode_three_tasks_grow_bases_and_keep_earlier_inputs():
    model = MLP(torch.float64)
    kl = KeepLoRA(model, full_config("keeplora"), progress=False)
    tasks = [make_task(t, dtype=torch.float64) for t in range(3)]
    ks = []
    for t, batch in enumerate(tasks):
        bases = {n: protected(layer) for n, layer in kl.layers.items()}
        before = {n: layer.weight.detach().clone() for n, layer in kl.layers.items()}
        kl.begin_task([batch], task_loss)
        losses = train(kl, batch, steps=10)
        assert losses[-1] < losses[0]
        kl.end_task([batch], task_loss)
        for n, layer in kl.layers.items():
            delta = layer.weight.detach() - before[n]
            assert (delta @ bases[n]).abs().max() <= 8 * FP32_EPS * delta.abs().max(), (t, n)
        ks.append(kl.layers["layers.0"].k_in)
    assert ks[0] < ks[1] < ks[2] or ks[-1] >= IN - 4, ks  # grows until only rank dims stay free
    # idle: the fixed trainable set (the target weights) holds no gradient
    assert [id(p) for p in kl.trainable_parameters()] == [id(layer.weight) for layer in kl.layers.values()]
    assert all(p.grad is None for p in kl.trainable_parameters())
