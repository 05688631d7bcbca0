"""Streaming sketches against the exact computations on the stacked data."""
import pytest
import torch

from helpers import free_port, raises, random_basis
from kplora_kernels import gpm_expand
from kplora_kernels.subspace import GradientSketch, InputSketch


def planted(n, dim, k, noise=0.05, seed=0, basis=None):
    """``n×dim`` inputs: a ``k``-dimensional signal with decaying scales plus isotropic noise."""
    gen = torch.Generator().manual_seed(seed)
    if basis is None:
        basis, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen, dtype=torch.float64))
    scales = torch.linspace(6, 2, basis.shape[1], dtype=torch.float64)
    signal = torch.randn(n, basis.shape[1], generator=gen, dtype=torch.float64) * scales
    return (signal @ basis.T + noise * torch.randn(n, dim, generator=gen, dtype=torch.float64)).float()


def captured_energy(X, V):
    X = X.double()
    return float(((X @ V.double()) ** 2).sum() / (X ** 2).sum())


def stream(sketch, X, batch=50):
    for start in range(0, X.shape[0], batch):
        sketch.update(X[start:start + batch])
    return sketch


def test_covariance_strategy_equals_exact_gpm_for_every_basis():
    X = planted(600, 32, 6)
    sketch = stream(InputSketch(32, strategy="covariance"), X)  # one sketch, as for q, k, v of a block
    assert sketch.strategy == "covariance" and sketch.memory_bytes == 32 * 32 * 4
    for V0 in (None, random_basis(32, 3, torch.float32, seed=1), random_basis(32, 5, torch.float32, seed=2)):
        for eps in (0.5, 0.9, 0.99):
            ours = sketch.expand(V0, eps)
            exact = gpm_expand(V0, X.double(), eps)
            assert ours.shape == exact.shape
            torch.testing.assert_close((ours @ ours.T).double(), exact @ exact.T, atol=1e-4, rtol=0)


@pytest.mark.parametrize("with_basis", [False, True])
def test_randomized_strategy_captures_the_exact_energy(with_basis):
    X = planted(2000, 96, 8)
    V0 = random_basis(96, 4, torch.float32) if with_basis else None
    sketch = stream(InputSketch(96, V0, strategy="randomized", width=40), X)
    held = 96 * 4 * 4 if with_basis else 0  # the small basis, on the device for the exact residual energy
    assert sketch.strategy == "randomized" and sketch.memory_bytes == 2 * 96 * 40 * 4 + held
    for eps in (0.9, 0.97):
        ours, exact = sketch.expand(V0, eps), gpm_expand(V0, X.double(), eps)
        assert abs(captured_energy(X, ours) - captured_energy(X, exact)) <= 0.01
        assert abs(ours.shape[1] - exact.shape[1]) <= 1
        torch.testing.assert_close(ours.T @ ours, torch.eye(ours.shape[1]), atol=1e-5, rtol=0)


def test_auto_strategy_follows_the_memory_budget():
    assert InputSketch(64, memory_budget=64 * 64 * 4).strategy == "covariance"
    small = InputSketch(64, memory_budget=64 * 64 * 4 - 1)
    assert small.strategy == "randomized" and small.memory_bytes <= 2 * 64 * 64 * 4


def test_rule_stops_at_threshold_and_never_exceeds_dim():
    X = planted(500, 16, 16, noise=0.0)
    sketch = stream(InputSketch(16, strategy="covariance"), X)
    V = sketch.expand(None, 1.0)
    assert V.shape == (16, 16)
    full = stream(InputSketch(16, V, strategy="covariance"), X)
    assert full.expand(V, 1.0).shape == (16, 16)


def test_merge_of_shards_equals_the_whole_stream():
    X = planted(400, 24, 5)
    for strategy in ("covariance", "randomized"):
        whole = stream(InputSketch(24, strategy=strategy, width=12), X)
        a = stream(InputSketch(24, strategy=strategy, width=12), X[:150])
        b = stream(InputSketch(24, strategy=strategy, width=12), X[150:])
        a.merge(b)
        torch.testing.assert_close(a.state, whole.state, atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(a.energy, whole.energy)
        assert a.tokens == whole.tokens == 400


def test_sketch_errors_and_nan_batches():
    sketch = InputSketch(8)
    with raises(ValueError, "(..., 8)", "(3, 7)"):
        sketch.update(torch.randn(3, 7))
    before = sketch.state.clone()
    bad = torch.randn(4, 8)
    bad[1, 2] = float("nan")
    with raises(ValueError, "NaN"):
        sketch.update(bad)
    assert torch.equal(sketch.state, before) and sketch.tokens == 0
    with raises(ValueError, "eps"):
        sketch.expand(None, 1.5)
    with raises(ValueError, "configuration"):
        sketch.merge(InputSketch(8, strategy="randomized", width=4))
    with raises(ValueError, "configuration"):
        InputSketch(8, strategy="randomized", width=4, seed=1).merge(InputSketch(8, strategy="randomized", width=4))
    residual = InputSketch(8, random_basis(8, 2, torch.float32), strategy="randomized", width=4)
    with raises(ValueError, "bases"):
        residual.merge(InputSketch(8, strategy="randomized", width=4))
    with raises(ValueError, "basis V"):
        residual.expand(random_basis(8, 2, torch.float32, seed=3), 0.9)
    with raises(ValueError, "V", "8 rows"):
        sketch.expand(random_basis(6, 2, torch.float32), 0.9)
    with raises(ValueError, "strategy"):
        InputSketch(8, strategy="fd")
    with raises(ValueError, "residual", "'exact'", "'sometimes'"):
        InputSketch(8, strategy="randomized", residual="sometimes")
    V8 = random_basis(8, 2, torch.float32)
    held = InputSketch(8, V8, strategy="randomized", width=4)
    with raises(ValueError, "V", "not the basis this sketch was built against"):
        held.residual_sketch(random_basis(8, 2, torch.float32, seed=9))
    torch.testing.assert_close(held.residual_sketch(V8.double()), held.residual_sketch())  # a copy in fp64 passes
    with raises(ValueError, "V_complement", "built with V_complement=False"):
        held.residual_energy(None, complement=True)
    grad = GradientSketch(6, 8, 1, V=random_basis(8, 2, torch.float32))
    grad.update(torch.randn(3, 6), torch.randn(3, 8))
    with raises(ValueError, "V", "not the basis this sketch was built against"):
        grad.adapter_init(V=random_basis(8, 2, torch.float32, seed=9))
    with raises(ValueError, "U", "built without a basis U"):
        grad.adapter_init(U=random_basis(6, 2, torch.float32))


def gradient_stream(out_f, in_f, batches=12, tokens=40, rank_signal=6, seed=0):
    """(dY, X) batches whose mean gradient has a decaying spectrum."""
    gen = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(out_f, rank_signal, generator=gen))[0]
    right = torch.linalg.qr(torch.randn(in_f, rank_signal, generator=gen))[0]
    decay = 0.6 ** torch.arange(rank_signal, dtype=torch.float32)
    pairs = []
    for _ in range(batches):
        z = torch.randn(tokens, rank_signal, generator=gen)
        X = z @ right.T + 0.01 * torch.randn(tokens, in_f, generator=gen)
        dY = (z * decay) @ left.T + 0.01 * torch.randn(tokens, out_f, generator=gen)
        pairs.append((dY, X))
    return pairs


def projected_mean_gradient(pairs, U, V):
    G = sum(dY.double().T @ X.double() for dY, X in pairs) / len(pairs)
    if U is not None:
        G = G - U.double() @ (U.double().T @ G)
    if V is not None:
        G = G - (G @ V.double()) @ V.double().T
    return G


@pytest.mark.parametrize("strategy", ["dense", "randomized"])
@pytest.mark.parametrize("bases", [False, True])
def test_gradient_sketch_adapter_captures_the_top_energy(strategy, bases):
    out_f, in_f, r = 40, 56, 4
    U = random_basis(out_f, 3, torch.float32, seed=7) if bases else None
    V = random_basis(in_f, 5, torch.float32, seed=8) if bases else None
    pairs = gradient_stream(out_f, in_f)
    sketch = GradientSketch(out_f, in_f, r, U=U, V=V, strategy=strategy)
    for dY, X in pairs:
        sketch.update(dY, X)
    A = sketch.adapter_init()
    G = projected_mean_gradient(pairs, U, V)
    exact = torch.linalg.svd(G)[2][:r]
    ours_energy = (G @ A.double().T).pow(2).sum()
    exact_energy = (G @ exact.T).pow(2).sum()
    assert ours_energy >= 0.95 * exact_energy
    assert A.shape == (r, in_f)
    torch.testing.assert_close(A @ A.T, torch.eye(r), atol=1e-5, rtol=0)
    if V is not None:
        assert (A @ V).abs().max() < 1e-5
    if strategy == "dense":
        torch.testing.assert_close(sketch.mean_gradient().double(), G, atol=1e-4, rtol=1e-4)
    else:
        k, l = r + 8, 2 * (r + 8) + 1  # range and co-range widths, each with its test matrix
        assert sketch.memory_bytes == 4 * (out_f * k + l * in_f + in_f * k + l * out_f)


def test_gradient_sketch_memory_at_7b_scale():
    sketch = GradientSketch(11008, 4096, 32)  # auto: the dense 11008×4096 gradient is over budget
    assert sketch.strategy == "randomized"
    assert sketch.memory_bytes < 0.05 * 11008 * 4096 * 4  # 7.3 MB against 180 MB


def test_gradient_sketch_feeds_from_the_layer_hook_and_respects_U():
    from torch import nn

    from kplora_kernels.nn import FusedKeepLoRALinear

    layer = FusedKeepLoRALinear.from_linear(nn.Linear(20, 16), rank=3)
    U, V = random_basis(16, 4, torch.float32), random_basis(20, 5, torch.float32)
    layer.set_bases(V=V, U=U)
    layer.grad_accumulator = sketch = GradientSketch(16, 20, 3, U=U, V=V, strategy="dense")
    x, target = torch.randn(32, 20), torch.randn(32, 16)
    ((layer(x) - target) ** 2).mean().backward()
    layer.grad_accumulator = None
    assert layer.weight.grad is None and sketch.batches == 1
    layer.reset_adapter(sketch.adapter_init())
    opt = torch.optim.SGD([layer.lora_B], lr=0.1)
    layer.lora_B.grad = None
    ((layer(x) - target) ** 2).mean().backward()
    opt.step()
    delta = layer.delta_weight()
    assert delta.abs().max() > 1e-4
    assert (U.T @ delta).abs().max() < 1e-6 and (delta @ V).abs().max() < 1e-6


def test_gradient_sketch_errors():
    with raises(ValueError, "rank"):
        GradientSketch(4, 5, 6)
    sketch = GradientSketch(4, 5, 2)
    with raises(RuntimeError, "before any update"):
        sketch.adapter_init()
    with raises(ValueError, "(..., 4)", "(3, 5)"):
        sketch.update(torch.randn(3, 5), torch.randn(3, 5))
    bad = torch.randn(3, 5)
    bad[0, 0] = float("inf")
    with raises(ValueError, "NaN or Inf"):
        sketch.update(torch.randn(3, 4), bad)
    assert sketch.batches == 0
    with raises(ValueError, "configuration"):
        sketch.merge(GradientSketch(4, 5, 2, seed=3, strategy="randomized"))
    with raises(NotImplementedError, "never forms"):
        GradientSketch(4, 5, 2, strategy="randomized").mean_gradient()



def _rank_main(rank, world, port, X, pairs, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        inputs = stream(InputSketch(24, strategy="randomized", width=12), X[rank::world])
        grads = GradientSketch(12, 24, 3, strategy="randomized")
        for dY, Xb in pairs[rank::world]:
            grads.update(dY, Xb)
        inputs.all_reduce()
        grads.all_reduce()
        results[rank] = (inputs.state, inputs.energy, inputs.tokens, grads.Y, grads.W, grads.batches)
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_two_gloo_processes():
    import torch.multiprocessing as mp

    X = planted(300, 24, 4)
    pairs = gradient_stream(12, 24, batches=6)
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank_main, args=(2, free_port(), X, pairs, results), nprocs=2, join=True)
    whole = stream(InputSketch(24, strategy="randomized", width=12), torch.cat([X[0::2], X[1::2]]))
    grads = GradientSketch(12, 24, 3, strategy="randomized")
    for dY, Xb in pairs:
        grads.update(dY, Xb)
    for rank in (0, 1):
        state, energy, tokens, Y, W, batches = results[rank]
        torch.testing.assert_close(state, whole.state, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(energy, whole.energy)
        torch.testing.assert_close(Y, grads.Y, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(W, grads.W, atol=1e-4, rtol=1e-4)
        assert tokens == 300 and batches == 6


def test_adapter_init_when_the_gradient_has_fewer_directions_than_rank():
    V = random_basis(24, 10, torch.float32)
    sketch = GradientSketch(16, 24, 4, V=V, strategy="dense")
    x = torch.randn(5, 1) @ torch.randn(1, 24)  # rank-1 inputs: the gradient has one direction
    sketch.update(torch.randn(5, 16), x)
    A = sketch.adapter_init()
    torch.testing.assert_close(A @ A.T, torch.eye(4), atol=1e-5, rtol=0)
    assert (A @ V).abs().max() < 1e-5
    G = sketch.mean_gradient().double()
    top = torch.linalg.svd(G)[2][:1]
    assert (top @ A.double().T).norm() > 0.999  # the one real direction is kept


@pytest.mark.parametrize("strategy", ["covariance", "randomized"])
def test_expand_in_complement_form_matches_the_plain_form(strategy):
    from kplora_kernels.subspace.sketch import complement_basis

    X = planted(800, 32, 6)
    V0 = random_basis(32, 20, torch.float32, seed=4)  # more than half: stored as a complement
    Vc = complement_basis(V0)
    plain = stream(InputSketch(32, V0, strategy=strategy, width=16), X)
    compl = stream(InputSketch(32, Vc, V_complement=True, strategy=strategy, width=16), X)
    V1 = plain.expand(V0, 0.99, keep_free=2)
    Vc1 = compl.expand(Vc, 0.99, V_complement=True, keep_free=2)
    assert V1.shape[1] + Vc1.shape[1] == 32 and Vc1.shape[1] >= 2
    torch.testing.assert_close((Vc1 @ Vc1.T).double(), torch.eye(32, dtype=torch.float64) - (V1 @ V1.T).double(),
                               atol=1e-3 if strategy == "randomized" else 1e-5, rtol=0)


def test_gradient_sketch_with_a_complement_basis():
    from kplora_kernels.subspace.sketch import complement_basis

    V = random_basis(24, 16, torch.float32)
    pairs = gradient_stream(12, 24)
    plain, compl = GradientSketch(12, 24, 3, V=V), GradientSketch(12, 24, 3, V=complement_basis(V), V_complement=True)
    for dY, X in pairs:
        plain.update(dY, X)
        compl.update(dY, X)
    torch.testing.assert_close(compl.mean_gradient(), plain.mean_gradient(), atol=1e-5, rtol=1e-5)
    A = compl.adapter_init()
    assert (A @ V).abs().max() < 1e-5


# --- the projections commute out of the sums: float64 oracle against the per-batch-projected form ----

import oracles  # noqa: E402
from kplora_kernels.subspace.common import _gaussian  # noqa: E402
from kplora_kernels.subspace.sketch import complement_basis  # noqa: E402

BASES = ["none", "plain", "complement"]


def _bases(kind, out_f, in_f, with_U):
    U = random_basis(out_f, 5, torch.float32, seed=11) if with_U else None
    V = random_basis(in_f, 9, torch.float32, seed=12)
    if kind == "none":
        return U, None, None, False
    if kind == "plain":
        return U, V, V, False
    return U, V, complement_basis(V), True  # the stored complement spans the residual space


def _within_rounding(ours, ref64, ref32):
    """``ours`` (fp32 state) is as close to the fp64 oracle as the oracle's own fp32 run is."""
    err, own = (ours - ref64).norm(), (ref32.double() - ref64).norm()
    assert err <= 4 * own + 1e-6 * ref64.norm(), (float(err), float(own))


@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("with_U", [False, True], ids=["no U", "U"])
@pytest.mark.parametrize("strategy", ["dense", "randomized"])
def test_gradient_sketch_equals_the_per_batch_projected_oracle(strategy, with_U, kind):
    out_f, in_f, r = 24, 40, 3
    U, V, stored, complement = _bases(kind, out_f, in_f, with_U)
    pairs = gradient_stream(out_f, in_f, batches=5, tokens=30)
    sketch = GradientSketch(out_f, in_f, r, U=U, V=stored, V_complement=complement, strategy=strategy, seed=5)
    for dY, X in pairs:
        sketch.update(dY, X)
    ref = lambda dt: [(dY.to(dt), X.to(dt)) for dY, X in pairs]  # noqa: E731
    cast = lambda B, dt: None if B is None else B.to(dt)  # noqa: E731
    if strategy == "dense":
        ref64 = oracles.gradient_sum(ref(torch.float64), cast(U, torch.float64), cast(stored, torch.float64), complement)
        ref32 = oracles.gradient_sum(ref(torch.float32), U, stored, complement)
        _within_rounding(sketch.projected_sketch(), ref64, ref32)
        # and the same as projecting with the plain basis: both storage forms give one Ĝ
        plain = oracles.gradient_sum(ref(torch.float64), cast(U, torch.float64), cast(V, torch.float64))
        # the fp32 complement of V is orthogonal to V to fp32 rounding only
        assert (ref64 - plain).norm() <= 1e-5 * plain.norm()
    else:
        k, l = sketch.Y.shape[1], sketch.W.shape[0]
        omega, psi = _gaussian(in_f, k, 5, "cpu"), _gaussian(l, out_f, 6, "cpu")
        Y64, W64 = oracles.gradient_sketch(ref(torch.float64), omega, psi, cast(U, torch.float64),
                                           cast(stored, torch.float64), complement)
        Y32, W32 = oracles.gradient_sketch(ref(torch.float32), omega.float(), psi.float(), U, stored, complement)
        Y, W = sketch.projected_sketch()
        _within_rounding(Y, Y64, Y32)
        _within_rounding(W, W64, W32)


@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("strategy", ["covariance", "randomized"])
def test_input_sketch_equals_the_per_batch_projected_oracle(strategy, kind):
    dim = 40
    _, V, stored, complement = _bases(kind, 8, dim, False)
    X = planted(300, dim, 5)
    batches = [X[i:i + 60] for i in range(0, 300, 60)]
    sketch = InputSketch(dim, stored, V_complement=complement, strategy=strategy, width=16, seed=3)
    for b in batches:
        sketch.update(b)
    b64 = [b.double() for b in batches]
    if strategy == "covariance":
        _within_rounding(sketch.state.double(), oracles.input_covariance(b64), oracles.input_covariance(batches))
    else:
        omega = _gaussian(dim, 16, 3, "cpu")
        S64, _, _ = oracles.input_sketch(b64, omega, None if stored is None else stored.double(), complement)
        S32, _, _ = oracles.input_sketch(batches, omega.float(), stored, complement)
        _within_rounding(sketch.residual_sketch(), S64, S32)
    _, total, residual = oracles.input_sketch(b64, _gaussian(dim, 1, 0, "cpu"),
                                              None if stored is None else stored.double(), complement)
    assert float(sketch.energy[0]) == pytest.approx(total, rel=1e-6)
    if strategy == "covariance":  # the covariance strategy has the residual energy exactly
        assert sketch.residual_energy(stored, complement) == pytest.approx(residual, rel=1e-5)


def test_merge_of_gradient_shards_with_bases_equals_the_whole_stream():
    U, V = random_basis(24, 4, torch.float32, seed=1), random_basis(40, 7, torch.float32, seed=2)
    pairs = gradient_stream(24, 40, batches=6, tokens=20)
    for strategy in ("dense", "randomized"):
        make = lambda: GradientSketch(24, 40, 3, U=U, V=V, strategy=strategy)  # noqa: E731
        whole, a, b = make(), make(), make()
        for i, (dY, X) in enumerate(pairs):
            whole.update(dY, X)
            (a if i % 2 else b).update(dY, X)
        a.merge(b)
        for x, y in zip(a._state(), whole._state()):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        assert a.batches == whole.batches == 6
        torch.testing.assert_close(a.adapter_init(), whole.adapter_init(), atol=1e-4, rtol=0)


# --- residual energy estimate of the randomized input sketch, and the GPM rule it feeds ------------

def spectrum_inputs(n, dim, decay, seed=0):
    """``n×dim`` inputs whose covariance spectrum is ``decay**j`` (``decay < 1``) or ``j**-decay``."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0]
    j = torch.arange(1, dim + 1, dtype=torch.float64)
    spectrum = decay ** j if decay < 1 else j ** -decay
    return (torch.randn(n, dim, generator=gen, dtype=torch.float64) * spectrum.sqrt()) @ basis.T


def energies(X, V0):
    """``‖X‖²`` and the exact captured fraction ``‖X V0‖² / ‖X‖²`` (fp64)."""
    E = float(X.pow(2).sum())
    R = X - (X @ V0.double()) @ V0.double().T
    return E, 1 - float(R.pow(2).sum()) / E


@pytest.mark.parametrize("decay", [0.97, 1.0], ids=["fast", "slow"])
def test_randomized_residual_energy_within_0_002_of_exact_gpm(decay):
    """What the GPM rule sees under the default ``residual="auto"`` (a basis of ``width`` columns:
    exact), on a fast ``0.97^j`` and a slow ``1/j`` spectrum, every seed."""
    dim, width = 1024, 256
    X = spectrum_inputs(2000, dim, decay)
    V0 = random_basis(dim, 256, torch.float32, seed=5)
    E, exact_captured = energies(X, V0)
    for seed in range(3):
        sketch = stream(InputSketch(dim, V0, strategy="randomized", width=width, seed=seed), X.float(), batch=500)
        assert sketch.exact_residual
        seen_captured = 1 - sketch.residual_energy() / E  # what the GPM rule sees
        assert abs(seen_captured - exact_captured) <= 0.002, (seed, seen_captured, exact_captured)


@pytest.mark.parametrize("decay", [0.97, 1.0], ids=["fast", "slow"])
def test_nystrom_plus_plus_estimate_is_unbiased_and_as_accurate_as_documented(decay):
    """``residual="estimate"`` (a basis wider than the sketch): within 0.002 on every seed for fast
    decay; for the slow ``1/j`` spectrum unbiased (the mean over 8 seeds within 0.0015) with the
    documented spread (each within 0.005, about 4 standard deviations)."""
    dim, width = 1024, 256
    X = spectrum_inputs(2000, dim, decay)
    V0 = random_basis(dim, 512, torch.float32, seed=5)
    E, exact_captured = energies(X, V0)
    errors = []
    for seed in range(8):
        sketch = stream(InputSketch(dim, V0, strategy="randomized", width=width, seed=seed, residual="estimate"),
                        X.float(), batch=500)
        assert not sketch.exact_residual
        errors.append(1 - sketch.residual_energy() / E - exact_captured)
    errors = torch.tensor(errors)
    if decay < 1:
        assert errors.abs().max() <= 0.002, errors
    else:
        assert abs(float(errors.mean())) <= 0.0015 and errors.abs().max() <= 0.005, errors


def test_xnystrace_is_exact_on_low_rank_and_falls_back_when_the_core_is_singular():
    from kplora_kernels.subspace.nystrom import _nystrom_pp, _xnystrace

    gen = torch.Generator().manual_seed(0)
    G = torch.randn(200, 20, generator=gen, dtype=torch.float64)
    A = G @ G.T  # rank 20 < 64 columns: the Nyström approximation is A itself
    Om = torch.randn(200, 64, generator=gen, dtype=torch.float64)
    assert _xnystrace(A @ Om, Om, 200) == pytest.approx(float(A.trace()), rel=1e-8)
    # unbiased on a full-rank spectrum: the mean over draws approaches the trace
    D = torch.diag(1.0 / torch.arange(1, 201, dtype=torch.float64))
    draws = [_xnystrace(D @ O, O, 200) for O in torch.randn(40, 200, 16, generator=gen, dtype=torch.float64)]
    assert sum(draws) / len(draws) == pytest.approx(float(D.trace()), rel=0.01)
    # more columns than the subspace they live in: the core is singular, no estimate (Nyström++ serves)
    P = torch.linalg.qr(torch.randn(200, 10, generator=gen, dtype=torch.float64))[0]
    Om_sub = P @ torch.randn(10, 16, generator=gen, dtype=torch.float64)
    Y = (P @ P.T) @ A @ (P @ P.T) @ Om_sub
    assert _xnystrace(Y, Om_sub, 10) is None
    assert _nystrom_pp(Y, Om_sub, 1e-12) == pytest.approx(float(((P @ P.T) @ A @ (P @ P.T)).trace()), rel=1e-6)


@pytest.mark.parametrize("complement", [False, True])
def test_randomized_residual_energy_exact_for_small_bases(complement):
    dim = 64
    X = spectrum_inputs(600, dim, 1.0)
    V0 = random_basis(dim, 8, torch.float32, seed=5)
    stored = complement_basis(random_basis(dim, 56, torch.float32, seed=6)) if complement else V0
    sketch = stream(InputSketch(dim, stored, V_complement=complement, strategy="randomized", width=32), X.float())
    assert sketch.exact_residual
    Xd = X.float().double()
    inside = float((Xd @ stored.double()).pow(2).sum())
    exact = inside if complement else float(Xd.pow(2).sum()) - inside
    assert sketch.residual_energy() == pytest.approx(exact, rel=1e-5)
    for eps in (0.5, 0.7):  # the rule's threshold is met (the width bounds what can be appended)
        grown = sketch.expand(stored, eps, V_complement=complement)
        kept = complement_basis(grown) if complement else grown
        assert captured_energy(X, kept) >= eps - 0.01


# --- the GPM expansion computes only what the rule appends ------------------------------------------

@pytest.mark.parametrize("decay", [0.5, 0.97, 0.995], ids=["fast", "medium", "slow"])
@pytest.mark.parametrize("complement", [False, True])
def test_gpm_expansion_iterative_equals_full_eigh(decay, complement):
    from kplora_kernels.subspace.linalg import gpm_expand_covariance

    dim = 300
    X = spectrum_inputs(1200, dim, decay, seed=1)
    C = X.T @ X
    V = random_basis(dim, 20, seed=2)
    base = complement_basis(V) if complement else V
    for eps in (0.6, 0.9):
        fast = gpm_expand_covariance(C, base, eps, complement=complement)
        # the oracle: the same rule on a full eigh of the residual covariance
        P = torch.eye(dim, dtype=torch.float64) - V @ V.T
        evals, evecs = torch.linalg.eigh(P @ C @ P)
        evals, evecs = evals.flip(0), evecs.flip(1)
        total = float(C.trace())
        captured = total - float(evals.sum())
        count = int(((captured + torch.cumsum(evals, 0) - evals) / total < eps).sum())
        grown = fast.shape[1] - 20 if not complement else (dim - 20) - fast.shape[1]
        assert abs(grown - count) <= 1, (grown, count)
        new = (torch.eye(dim, dtype=torch.float64) - fast @ fast.T) if complement else fast[:, 20:]
        got = float(torch.trace(new.T @ P @ C @ P @ new)) if not complement else None
        if got is not None:
            assert got >= float(evals[:count].sum()) * (1 - 1e-4)


# --- thin gradient sketches by default, accurate enough -------------------------------------------

def test_auto_takes_the_thin_sketch_at_large_sizes_and_it_suffices():
    from kplora_kernels.subspace.sketch import gradient_strategy

    assert gradient_strategy(4096, 4096, 32) == "randomized"  # fits in 64 MiB, but costs 34× the thin one
    assert gradient_strategy(11008, 4096, 32) == "randomized"
    assert gradient_strategy(64, 64, 4) == "dense"  # small layers stay exact
    out_f, in_f, r = 200, 300, 8
    U, V = random_basis(out_f, 10, torch.float32, seed=3), random_basis(in_f, 60, torch.float32, seed=4)
    gen = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(out_f, 12, generator=gen))[0]
    right = torch.linalg.qr(torch.randn(in_f, 12, generator=gen))[0]
    strength = 0.85 ** torch.arange(12, dtype=torch.float32)
    sketch = GradientSketch(out_f, in_f, r, U=U, V=V, memory_budget=DEFAULT_BUDGET)
    assert sketch.strategy == "randomized"
    pairs = []
    for _ in range(8):  # a rank-12 task gradient with decaying strength plus noise at 5 % of it
        z = torch.randn(64, 12, generator=gen)
        X = z @ right.T + 0.05 * torch.randn(64, in_f, generator=gen)
        dY = (z * strength) @ left.T + 0.05 * torch.randn(64, out_f, generator=gen)
        pairs.append((dY, X))
        sketch.update(dY, X)
    G = projected_mean_gradient(pairs, U, V)
    top = torch.linalg.svdvals(G)[:r].pow(2).sum()
    A = sketch.adapter_init().double()
    assert (G @ A.T).pow(2).sum() >= 0.99 * top


DEFAULT_BUDGET = 64 * 2**20


def test_dense_adapter_init_randomized_top_r_against_the_full_svd_oracle():
    out_f, in_f, r = 120, 150, 4
    sketch = GradientSketch(out_f, in_f, r, V=random_basis(in_f, 10, torch.float32), strategy="dense")
    pairs = gradient_stream(out_f, in_f, batches=4)
    for dY, X in pairs:
        sketch.update(dY, X)
    G = sketch.mean_gradient().double()
    exact = torch.linalg.svd(G)[2][:r]  # the oracle
    A = sketch.adapter_init().double()
    assert (G @ A.T).pow(2).sum() >= (1 - 1e-6) * (G @ exact.T).pow(2).sum()


# --- non-finite and out-of-range inputs ----------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["covariance", "randomized"])
def test_input_sketch_refuses_non_finite_and_overflowing_batches(strategy):
    sketch = InputSketch(16, strategy=strategy, width=8)
    sketch.update(torch.randn(10, 16))
    before, energy = sketch.state.clone(), sketch.energy.clone()
    for value, words in ((float("nan"), ("X", "NaN")), (float("inf"), ("X", "Inf")),
                         (-float("inf"), ("X", "Inf")), (1e20, ("X", "too large", "float32"))):
        bad = torch.randn(10, 16)
        bad[3, 4] = value
        with raises(ValueError, *words):
            sketch.update(bad)
        assert torch.equal(sketch.state, before) and torch.equal(sketch.energy, energy)
    huge = torch.full((4, 16), 1e20, dtype=torch.float64)  # fp64 input, finite, beyond the fp32 state
    with raises(ValueError, "X", "too large"):
        sketch.update(huge)
    assert sketch.tokens == 10
    assert sketch.expand(None, 0.9).shape[0] == 16  # the sketch is still usable


@pytest.mark.parametrize("strategy", ["dense", "randomized"])
def test_gradient_sketch_refuses_non_finite_batches_naming_the_argument(strategy):
    sketch = GradientSketch(12, 20, 2, strategy=strategy)
    sketch.update(torch.randn(5, 12), torch.randn(5, 20))
    before = [t.clone() for t in sketch._state()]
    dY, X = torch.randn(5, 12), torch.randn(5, 20)
    dY[0, 0] = float("nan")
    with raises(ValueError, "dY", "NaN"):
        sketch.update(dY, X)
    X[1, 1] = float("inf")
    with raises(ValueError, "NaN or Inf"):
        sketch.update(torch.randn(5, 12), X)
    with raises(ValueError, "too large"):
        sketch.update(torch.full((5, 12), 1e20), torch.full((5, 20), 1e20))
    assert all(torch.equal(a, b) for a, b in zip(sketch._state(), before)) and sketch.batches == 1
    assert sketch.adapter_init().shape == (2, 20)


@pytest.mark.parametrize("strategy", ["covariance", "randomized"])
def test_deferred_check_keeps_the_state_and_raises_at_finalisation(strategy):
    """The accelerator path (no host sync per batch), exercised on the CPU."""
    sketch = InputSketch(16, strategy=strategy, width=8)
    sketch._deferred = True
    sketch.update(torch.randn(10, 16))
    before = sketch.state.clone()
    bad = torch.randn(10, 16)
    bad[0, 0] = float("nan")
    sketch.update(bad)  # no raise here: no host sync
    assert torch.equal(sketch.state, before)
    with raises(ValueError, "1 batch(es) were refused", "X"):
        sketch.expand(None, 0.9)
    grads = GradientSketch(12, 20, 2, strategy="randomized")
    grads._deferred = True
    grads.update(torch.randn(5, 12), torch.randn(5, 20))
    Y = grads.Y.clone()
    grads.update(torch.full((5, 12), float("inf")), torch.randn(5, 20))
    assert torch.equal(grads.Y, Y)
    with raises(ValueError, "refused", "dY and X"):
        grads.adapter_init()


def test_state_overflow_over_many_batches_is_refused_at_finalisation():
    sketch = InputSketch(1, strategy="covariance")
    for _ in range(3):  # each batch is in range (x² = 2.25e38), their sum is not
        sketch.update(torch.full((1, 1), 1.5e19))
    with raises(ValueError, "overflowed", "inputs X"):
        sketch.expand(None, 0.9)


def test_block_triangular_covariance_is_the_whole_covariance(monkeypatch):
    """From TRIANGLE_MIN_DIM on only the upper block triangle is accumulated; what is read
    (covariance(), expand, energies) is the whole symmetric Σ XᵀX, also across merges and updates
    after a read, and a refused batch leaves the state as it was."""
    monkeypatch.setattr(InputSketch, "TRIANGLE_MIN_DIM", 8)
    X = planted(300, 30, 5, seed=3)
    batches = [X[i:i + 50] for i in range(0, 300, 50)]
    full64 = X.double().mT @ X.double()
    sketch = InputSketch(30, strategy="covariance")
    assert len(sketch._blocks) == 4
    for B in batches[:3]:
        sketch.update(B)
    half64 = torch.cat(batches[:3]).double().mT @ torch.cat(batches[:3]).double()
    torch.testing.assert_close(sketch.covariance().double(), half64, rtol=1e-5, atol=1e-3)
    other = InputSketch(30, strategy="covariance")
    for B in batches[3:5]:
        other.update(B)
    other.covariance()  # read (mirrored) before being merged
    sketch.merge(other)
    sketch.update(batches[5])  # an update after a read
    C = sketch.covariance()
    torch.testing.assert_close(C.double(), full64, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(C, C.mT, rtol=1e-6, atol=1e-4)  # the diagonal blocks are GEMMs, as before
    before = sketch.state.clone()
    with raises(ValueError, "X", "NaN"):
        sketch.update(torch.full((4, 30), float("nan")))
    assert torch.equal(sketch.state, before)
    V0 = random_basis(30, 4, torch.float32, seed=1)
    exact = gpm_expand(V0, X.double(), 0.9)
    ours = sketch.expand(V0, 0.9)
    torch.testing.assert_close((ours @ ours.T).double(), exact @ exact.T, atol=1e-4, rtol=0)
    assert abs(sketch.residual_energy(V0) - float((X.double() - X.double() @ V0.double() @ V0.double().T).pow(2).sum())) \
        <= 1e-5 * float(X.double().pow(2).sum())


# --- half-precision inputs: fp32-output half products (CUDA), emulated on the CPU -----------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs_covariance_route_equals_the_upcast_products(dtype, monkeypatch):
    """Products of two half values are exact in fp32: the covariance on the half route (fp32-output
    half GEMMs on CUDA) is the upcast path's to fp32 summation order."""
    from kplora_kernels.subspace import half as half_module

    X = (planted(300, 1100, 6) * 0.5).to(dtype)  # dim ≥ TRIANGLE_MIN_DIM: several column blocks
    upcast = stream(InputSketch(1100, strategy="covariance"), X, batch=100)
    monkeypatch.setattr(half_module, "_EMULATE_HALF", True)
    half = stream(InputSketch(1100, strategy="covariance"), X, batch=100)
    torch.testing.assert_close(half.covariance(), upcast.covariance(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(half.energy, upcast.energy)


def test_half_inputs_randomized_route_within_a_split_factor_of_fp32(monkeypatch):
    """bf16 inputs on the half route: ``Ω̂``, the basis and ``X Ω̂`` split as ``hi + lo`` in bf16. The
    sketch's error against float64 stays far below a plain bf16 torch run's (``Xᵀ(X Ω̂_bf16)`` with
    bf16 outputs), and the exact residual energy within 1e-6 of ``‖X‖²`` (the split's 16 bits; the
    ``hi`` part alone is off by 2e-5 here); fp16 keeps the upcast path."""
    from kplora_kernels.subspace import half as half_module

    dim, width = 96, 24
    X = planted(400, dim, 8).to(torch.bfloat16)
    V0 = random_basis(dim, 10, torch.float32, seed=3)
    monkeypatch.setattr(half_module, "_EMULATE_HALF", True)
    half = stream(InputSketch(dim, V0, strategy="randomized", width=width, seed=1), X, batch=100)
    assert half.exact_residual
    Xd, Om = X.double(), half.omega.double()
    oracle = Xd.T @ (Xd @ Om)
    plain_bf16 = sum((b.T @ (b @ half.omega.to(torch.bfloat16))).double() for b in X.split(100))
    err, bf16_err = (half.state.double() - oracle).abs().max(), (plain_bf16 - oracle).abs().max()
    assert err <= bf16_err / 16, (float(err), float(bf16_err))
    E, inside = float(Xd.pow(2).sum()), float((Xd @ V0.double()).pow(2).sum())
    assert abs(float(half.energy[1]) - inside) <= 1e-6 * E
    assert abs(half.residual_energy() - (E - inside)) <= 1e-5 * E  # ‖X‖² is summed in fp32
    # fp16 takes the upcast path (its range is too small for the split products): the state of the
    # same values given in fp32
    X16 = X.to(torch.float16)
    routed = stream(InputSketch(dim, V0, strategy="randomized", width=width, seed=1), X16, batch=100)
    upcast = stream(InputSketch(dim, V0, strategy="randomized", width=width, seed=1), X16.float(), batch=100)
    assert torch.equal(routed.state, upcast.state)
    torch.testing.assert_close(routed.energy, upcast.energy, rtol=1e-6, atol=0)


def test_half_route_factors_sit_on_the_split_grid(monkeypatch):
    """A sketch that may take the half route holds ``Ω̂`` and the energy's basis on the bf16 ``hi + lo``
    grid from the start: its fp32 form and its split hold the same values, so a stream that starts in
    fp32 and continues in bf16 (or a rank that saw only fp32) finalises with the same ``Ω̂``."""
    from kplora_kernels.subspace import half as half_module

    monkeypatch.setattr(half_module, "_EMULATE_HALF", True)
    V0 = random_basis(64, 6, torch.float32, seed=2)
    X = planted(120, 64, 5)
    mixed = InputSketch(64, V0, strategy="randomized", width=16)
    before = mixed.omega.clone()
    mixed.update(X[:60])  # fp32 first
    mixed.update(X[60:].to(torch.bfloat16))  # then bf16: the split is taken
    assert mixed._omega._fp32 is None and torch.equal(mixed.omega, before)
    hi, lo = half_module._split(before)
    assert torch.equal(hi.float() + lo.float(), before)  # re-splitting the grid value is lossless
    monkeypatch.setattr(half_module, "_EMULATE_HALF", False)
    plain = InputSketch(64, V0, strategy="randomized", width=16)  # a CPU sketch: fp32 Ω̂ as formed
    assert not torch.equal(plain.omega, before) and (plain.omega - before).abs().max() <= 2 ** -16 * before.abs().max()


@pytest.mark.parametrize("dtype,routed", [(torch.bfloat16, True), (torch.float16, False)], ids=["bf16", "fp16"])
def test_half_route_leaves_fp16_out_under_fp16_accumulation(dtype, routed, monkeypatch):
    """With ``allow_fp16_accumulation`` cuBLAS gives no fp32 output for fp16 inputs: fp16 stays off."""
    from kplora_kernels.subspace import half as half_module

    monkeypatch.setattr(half_module, "_EMULATE_HALF", True)
    X = torch.zeros(2, 4, dtype=dtype)
    assert half_module._half_route(X)
    matmul = torch.backends.cuda.matmul  # a module whose flags are properties: set and restore by hand
    if not hasattr(matmul, "allow_fp16_accumulation"):
        pytest.skip("this torch has no allow_fp16_accumulation: nothing to route around")
    saved = matmul.allow_fp16_accumulation
    try:
        matmul.allow_fp16_accumulation = True
        assert half_module._half_route(X) == routed
    finally:
        matmul.allow_fp16_accumulation = saved


@pytest.mark.parametrize("deferred", [False, True], ids=["cpu-immediate", "accelerator-deferred"])
def test_half_route_refuses_a_non_finite_batch_without_a_trace(deferred, monkeypatch):
    """Both refusal contracts on the half route: at once (CPU), and through ``torch.where`` with the
    device counter read at finalisation (an accelerator's, forced here as in the tests above)."""
    from kplora_kernels.subspace import half as half_module

    monkeypatch.setattr(half_module, "_EMULATE_HALF", True)
    X = planted(100, 48, 4).to(torch.bfloat16)
    V0 = random_basis(48, 4, torch.float32)
    for strategy in ("covariance", "randomized"):
        sketch = InputSketch(48, V0, strategy=strategy, width=16)
        sketch._deferred = deferred
        stream(sketch, X)
        before = (sketch.state.clone(), sketch.energy.clone())
        bad = X.clone()
        bad[3, 5] = float("inf")
        if deferred:
            sketch.update(bad)
            assert int(sketch._refused) == 1
            with raises(ValueError, "1 batch(es) were refused"):
                sketch.expand(V0, 0.9)
        else:
            with raises(ValueError, "X", "NaN or Inf"):
                sketch.update(bad)
        assert torch.equal(sketch.state, before[0]) and torch.equal(sketch.energy, before[1])
