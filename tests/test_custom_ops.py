"""The ops as ``torch.library`` custom ops: opcheck on every registration, ``torch.compile`` with
``fullgraph=True`` and no graph break, profiles that name ``kplora::`` ops, and a training step that
never imports the oracle. Compile tests are few and tiny (inductor compiles C++ on the CPU)."""
import subprocess
import sys
import textwrap

import pytest
import torch

import oracles
from helpers import random_basis
from kplora_kernels import ops
from kplora_kernels.nn import FusedKeepLoRALinear
from kplora_kernels.ops import cpp

CPP = cpp.load(jit=True)
BACKENDS = ["torch"] + (["cpp"] if CPP else [])


def case(out_dim=12, in_dim=10, k_out=3, k_in=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(out_dim, in_dim, generator=gen)
    return G, random_basis(out_dim, k_out, torch.float32, seed + 1), random_basis(in_dim, k_in, torch.float32, seed + 2)


def opcheck(op, args, kwargs=None):
    torch.library.opcheck(op, args, kwargs)  # schema, fake tensor, autograd registration, aot_dispatch


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_projection_ops(backend):
    G, U, V = case()
    Gg = G.clone().requires_grad_()
    opcheck(torch.ops.kplora.residual_projection.default, (Gg, U, V, 0.5, False, False, backend))
    opcheck(torch.ops.kplora.residual_projection.default, (G, None, V, 1.0, False, False, backend))
    opcheck(torch.ops.kplora.residual_projection_out.default, (G, U, V, 0.5, False, False, backend, torch.empty_like(G)))
    opcheck(torch.ops.kplora.residual_projection_.default, (G.clone(), U, V, 0.5, False, False, backend))
    opcheck(torch.ops.kplora.row_projection.default, (torch.randn(3, 5, 10, requires_grad=True), V, 0.7, False, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_grouped_ops(backend):
    G, U, V = case()
    # the C++ kernel takes no complement basis: the torch backend covers that form
    Vc, vc = (V, False) if backend == "cpp" else (random_basis(10, 7, torch.float32, seed=5), True)
    opcheck(torch.ops.kplora.residual_projection.default, (G.clone().requires_grad_(), U, Vc, 0.5, False, vc, backend))
    Gs = [G.clone(), torch.randn(6, 10)]
    opcheck(torch.ops.kplora.grouped_projection_.default,
            (Gs, [U, None], [V, V], [0.5, 1.0], [False, False], [False, False], backend))
    W0 = torch.randn(12, 10)
    W0V, UtW0 = torch.ops.kplora.subspace_anchor(W0, U, V)
    opcheck(torch.ops.kplora.subspace_anchor.default, (W0, U, V))
    opcheck(torch.ops.kplora.subspace_anchor.default, (W0, None, V))
    opcheck(torch.ops.kplora.constraint_restore_.default,
            ([G.clone(), G.clone() + 1], [U, U], [V, Vc], [None, W0], [W0V, None], [UtW0, None],
             [False, False], [False, vc], backend))


def test_opcheck_sketch_update():
    gen = torch.Generator().manual_seed(3)
    A, B = torch.randn(9, 6, generator=gen), torch.randn(9, 5, generator=gen)
    M1, M2 = torch.randn(5, 3, generator=gen), torch.randn(6, 4, generator=gen)
    opcheck(torch.ops.kplora.sketch_update.default, (A, B, M1, M2, None))
    opcheck(torch.ops.kplora.sketch_update.default, (A, A, torch.randn(6, 3, generator=gen), None, "torch"))
    acc1, acc2, probe = ops.sketch_update(A, B, M1, M2)
    o1, o2, oprobe = oracles.sketch_update(A, B, M1, M2)
    # fp32 GEMMs over 9 tokens against float64: a few fp32 roundings of the largest partial sums
    for ours, oracle in ((acc1, o1), (acc2, o2), (probe, oprobe)):
        tol = 16 * torch.finfo(torch.float32).eps * float(oracle.abs().max())
        assert float((ours.double() - oracle).abs().max()) <= tol


def test_gradient_of_the_projection_is_the_projection():
    """P is self-adjoint: d/dG ⟨P(G), Y⟩ = P(Y), against the float64 oracle."""
    G, U, V = case()
    G = G.double().requires_grad_()
    U, V = U.double(), V.double()
    Y = torch.randn_like(G)
    (ops.residual_project(G, U, V, 0.3) * Y).sum().backward()
    torch.testing.assert_close(G.grad, oracles.residual_project(Y, U, V, 0.3))
    X = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    (ops.project_rows(X, V, 2.0) * X.detach()).sum().backward()
    torch.testing.assert_close(X.grad, oracles.project_rows(X.detach(), V, 2.0))
    with pytest.raises(ValueError, match="U requires grad"):
        ops.residual_project(G, U.clone().requires_grad_(), V)


def _public_calls(G, U, V, W, W0, A, B, M1):
    P = ops.residual_project(G, U, V, 0.5)
    R = ops.project_rows(G, V, 1.0)
    out = torch.empty_like(G)
    ops.residual_project(G, U, V, 2.0, out=out)
    H = G.clone()
    ops.residual_project(H, U, V, 1.0, out=H)
    Gs = [G.clone(), G.clone() * 2]
    ops.residual_project_grouped_(Gs, [U, U], [V, V], [1.0, 0.5])
    anchor = ops.subspace_anchor(W0, U, V)
    W1, W2 = W.clone(), W.clone()
    ops.subspace_restore_(W1, U, V, anchor=anchor)
    ops.subspace_restore_(W2, U, V, W0=W0)
    acc1, _, probe = ops.sketch_update(A, B, M1)
    return P, R, out, H, Gs[0], Gs[1], anchor.W0V, anchor.UtW0, W1, W2, acc1, probe


def _public_args():
    G, U, V = case()
    gen = torch.Generator().manual_seed(7)
    W0 = torch.randn(12, 10, generator=gen)
    W = W0 + torch.randn(12, 10, generator=gen)
    A, B = torch.randn(8, 6, generator=gen), torch.randn(8, 5, generator=gen)
    return G, U, V, W, W0, A, B, torch.randn(5, 3, generator=gen)


def test_every_public_op_traces_without_a_graph_break():
    args = _public_args()
    explanation = torch._dynamo.explain(_public_calls)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(_public_calls, backend="aot_eager", fullgraph=True)
    for got, expected in zip(compiled(*args), _public_calls(*args)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_residual_project_compiles_with_inductor_and_matches_eager():
    G, U, V = case(24, 20, 3, 5)
    fn = lambda G, U, V: ops.residual_project(G, U, V, 0.5) * 2.0 + ops.project_rows(G, V)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(G, U, V), fn(G, U, V))
    oracle = 2.0 * oracles.residual_project(G.double(), U.double(), V.double(), 0.5) + \
        oracles.project_rows(G.double(), V.double())
    # fp32 thin products against float64: a few roundings of the largest term
    assert float((compiled(G, U, V).double() - oracle).abs().max()) <= 32 * torch.finfo(torch.float32).eps * \
        float(oracle.abs().max())


def _layer():
    torch.manual_seed(0)
    layer = FusedKeepLoRALinear(16, 12, rank=4, alpha=2.0, train_A=True)
    layer.set_bases(V=random_basis(16, 5, torch.float32, seed=1), U=random_basis(12, 3, torch.float32, seed=2))
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_fused_linear_forward_backward_compiled_with_both_bases():
    layer = _layer()
    x = torch.randn(2, 3, 16, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.pow(2).sum().backward()
    grads = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    layer(x).pow(2).sum().backward()
    for got, t in zip(grads, (x, layer.lora_A, layer.lora_B)):
        torch.testing.assert_close(got, t.grad)
    assert (layer.U.T @ grads[2]).abs().max() < 1e-5  # dB ⟂ U
    assert (grads[1] @ layer.V).abs().max() < 1e-5  # dA ⟂ V


def test_profiled_fused_linear_shows_kplora_ops():
    layer = _layer()
    x = torch.randn(5, 16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(x).pow(2).sum().backward()
    names = {e.name for e in prof.events()}
    assert {"kplora::residual_projection", "kplora::row_projection"} <= names, sorted(n for n in names if "kplora" in n)


def test_training_a_step_never_imports_the_oracle():
    script = textwrap.dedent("""
        import sys, torch
        import kplora_kernels as kp
        from kplora_kernels.nn import FusedKeepLoRALinear, register_projection_hooks
        layer = FusedKeepLoRALinear(16, 12, rank=4, train_A=True)
        Q = torch.linalg.qr(torch.randn(16, 5))[0]
        layer.set_bases(V=Q, U=torch.linalg.qr(torch.randn(12, 3))[0])
        opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
        register_projection_hooks(layer, opt)
        layer(torch.randn(8, 16)).pow(2).sum().backward()
        opt.step()
        layer.merge_()
        G = torch.randn(12, 16)
        kp.ops.residual_project_grouped_([G], [layer.U], [layer.V])
        bad = sorted(m for m in sys.modules if m.endswith("ops.reference") or m == "oracles")
        print("IMPORTED", bad)
        sys.exit(1 if bad else 0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "IMPORTED []" in result.stdout


def test_sketch_update_dispatch_states_its_reasons(monkeypatch):
    from kplora_kernels.subspace import GradientSketch

    A = torch.randn(6, 5)
    M1 = torch.randn(5, 3)
    with pytest.raises(ValueError, match="backend 'cpp' cannot run the sketch update.*no C\\+\\+ sketch kernel"):
        ops.sketch_update(A, A, M1, backend="cpp")
    reasons = ops.sketch_not_supported_reasons("triton", A.double(), A.double(), 200, 300)
    assert any("float64" in r for r in reasons) and any("K = 200" in r for r in reasons) and \
        any("L = 300" in r for r in reasons)
    assert ops.resolve_sketch_backend(A, A, 3) == "torch"  # CPU tensors, nothing forced
    sketch = GradientSketch(5, 6, 2, strategy="randomized")
    monkeypatch.setenv("KPLORA_BACKEND", "cpp")  # forced for every call: the sketch refuses, never falls back
    with pytest.raises(ValueError, match="no C\\+\\+ sketch kernel"):
        sketch.update(torch.randn(4, 5), torch.randn(4, 6))
    monkeypatch.setenv("KPLORA_BACKEND", "torch")
    sketch.update(torch.randn(4, 5), torch.randn(4, 6))
    assert sketch.batches == 1


def test_cpp_is_picked_only_in_its_measured_window():
    if not CPP:
        pytest.skip(f"C++ kernels unavailable: {cpp.unavailable_reason()}")
    thin = torch.empty(4096, 16)  # a LoRA factor dB against a 64-wide U: 3× slower in C++
    assert ops.resolve_backend(thin, None, k_out=64, k_in=0) == "torch"
    assert ops.resolve_backend(torch.empty(128, 1024), None, k_out=16, k_in=16) == "torch"
    assert ops.resolve_backend(torch.empty(1024, 1024), None, k_out=0, k_in=64) == "cpp"
    assert ops.resolve_backend(torch.empty(1024, 1024), None, k_out=0, k_in=65) == "torch"
    assert ops.resolve_backend(thin, "cpp", k_out=64, k_in=0) == "cpp"  # forcing still runs it


def _train(step, compiled, steps=3):
    f = torch.compile(step, backend="aot_eager") if compiled else step
    for _ in range(steps):
        f(torch.ones(6, 16) * 0.3)


def test_compiled_training_steps_equal_eager_lora_and_full_mode():
    """A wrapped MLP's LoRA step (projection hooks after the optimizer) and a full-mode step (the
    grouped gradient projection between backward and step), compiled, equal eager; the graph breaks
    of the full-mode step are torch's own (backward, optimizer), none in this package."""
    from torch import nn

    from kplora_kernels.nn import register_projection_hooks

    def lora_model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8)).requires_grad_(False)
        m[0], m[2] = FusedKeepLoRALinear.from_linear(m[0], 4), FusedKeepLoRALinear.from_linear(m[2], 4)
        m[0].set_bases(V=random_basis(16, 5, torch.float32), U=random_basis(12, 3, torch.float32))
        m[2].set_bases(U=random_basis(8, 2, torch.float32))
        return m

    Us, Vs = [random_basis(12, 2, torch.float32), None], [random_basis(16, 5, torch.float32),
                                                         random_basis(12, 3, torch.float32)]
    results = {}
    for mode in ("lora", "full"):
        for compiled in (False, True):
            torch.manual_seed(0)
            m = lora_model() if mode == "lora" else nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
            params = [p for p in m.parameters() if p.requires_grad] if mode == "lora" else [m[0].weight, m[2].weight]
            opt = torch.optim.SGD(params, lr=0.1)
            if mode == "lora":
                register_projection_hooks(m, opt)

            def step(x):
                m(x).pow(2).sum().backward()
                if mode == "full":
                    ops.residual_project_grouped_([p.grad for p in params], Us, Vs, [0.5, 1.0])
                opt.step()
                opt.zero_grad()

            _train(step, compiled)
            results[mode, compiled] = [p.detach().clone() for p in params]
            if mode == "full" and compiled:
                torch._dynamo.reset()
                explanation = torch._dynamo.explain(step)(torch.ones(6, 16))
                frames = [f.filename for r in explanation.break_reasons for f in r.user_stack]
                assert not any("kplora_kernels" in f for f in frames), explanation.break_reasons
    for mode in ("lora", "full"):
        for a, b in zip(results[mode, False], results[mode, True]):
            torch.testing.assert_close(a, b)
    # the full-mode steps moved the weights, and only inside the residual subspace
    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    for W0, W, U, V in zip((start[0].weight, start[2].weight), results["full", True], Us, Vs):
        delta = (W - W0).detach()
        assert delta.abs().max() > 1e-3
        tol = 32 * torch.finfo(torch.float32).eps * delta.abs().max()  # fp32 roundings of 3 projected steps
        assert (delta @ V).abs().max() <= tol
        if U is not None:
            assert (U.T @ delta).abs().max() <= tol


def test_torch_export_keeps_the_ops_as_nodes():
    class Project(torch.nn.Module):
        def __init__(self):
            super().__init__()
            _, self.U, self.V = case()

        def forward(self, G):
            return ops.residual_project(G, self.U, self.V, 0.5) + ops.project_rows(G, self.V)

    module, G = Project(), case(seed=4)[0]
    exported = torch.export.export(module, (G,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"kplora.residual_projection.default", "kplora.row_projection.default"} <= targets, targets
    torch.testing.assert_close(exported.module()(G), module(G))
