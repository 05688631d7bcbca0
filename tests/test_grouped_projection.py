"""Full fine-tuning ops: the grouped in-place projection and the post-step constraint restore,
against the float64 oracles in tests/oracles.py.

Tolerance (docs/design.md §3): an op's error against float64 may be at most 4× the same-dtype
torch reference's own error, plus two roundings of the largest term.
"""
import pytest
import torch

from helpers import raises, random_basis
from kplora_kernels import ops
import oracles
from kplora_kernels.ops import cpp, torch_backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def device_for(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def as64(t):
    return None if t is None else t.detach().cpu().double()


def assert_close_to_oracle(result, oracle, own, scale_of_terms, dtype, factor=4.0):
    """``result`` (any dtype) vs the float64 ``oracle``; ``own``: the same-dtype torch reference."""
    err = (as64(result) - oracle).abs().max().item()
    ref_err = (as64(own) - oracle).abs().max().item()
    one_rounding = torch.finfo(dtype).eps * scale_of_terms
    assert err <= factor * ref_err + 2 * one_rounding, f"error {err:.3g} vs reference's own {ref_err:.3g}"


# (out, in, k_out, k_in, U_complement, V_complement); None: no basis on that side; 0: empty basis
CASES = [(24, 40, None, 6, False, False), (24, 40, 3, 6, False, False), (40, 24, 5, None, False, False),
         (24, 40, 0, 0, False, False), (24, 40, None, 6, False, False), (40, 24, 4, 20, False, True),
         (24, 40, 18, None, True, False), (40, 24, 3, 5, False, False)]


def make_group(dtype, device, cases=CASES, seed=0):
    Gs, Us, Vs, scales, ucs, vcs = [], [], [], [], [], []
    for i, (o, n, ko, ki, uc, vc) in enumerate(cases):
        gen = torch.Generator().manual_seed(seed + i)
        Gs.append(torch.randn(o, n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device))
        Us.append(None if ko is None else random_basis(o, ko, seed=seed + 10 + i).to(dtype=dtype, device=device))
        Vs.append(None if ki is None else random_basis(n, ki, seed=seed + 20 + i).to(dtype=dtype, device=device))
        scales.append(0.2 + 0.1 * i)
        ucs.append(uc)
        vcs.append(vc)
    return Gs, Us, Vs, scales, ucs, vcs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_projection_matches_oracle(backend, dtype):
    Gs, Us, Vs, scales, ucs, vcs = make_group(dtype, device_for(backend))
    originals = [G.clone() for G in Gs]
    ptrs = [G.data_ptr() for G in Gs]
    # the C++ kernel applies I − BBᵀ only: the complement entries go through auto dispatch
    chosen = None if backend == "cpp" else backend
    returned = ops.residual_project_grouped_(Gs, Us, Vs, scales, U_complement=ucs, V_complement=vcs,
                                             backend=chosen)
    assert [G.data_ptr() for G in returned] == ptrs and all(r is G for r, G in zip(returned, Gs))
    for G, G0, U, V, s, uc, vc in zip(Gs, originals, Us, Vs, scales, ucs, vcs):
        # the inputs as rounded to their dtype, exactly, in float64 (a rounded basis is only nearly orthonormal)
        oracle = oracles.residual_project_unchecked(as64(G0), as64(U), as64(V), s, uc, vc)
        own = oracles.residual_project(G0, U, V, s, U_complement=uc, V_complement=vc)
        assert_close_to_oracle(G, oracle, own, s * G0.abs().max().item(), dtype)


def test_grouped_projection_twice_is_one_projection(backend):
    Gs, Us, Vs, _, ucs, vcs = make_group(torch.float32, device_for(backend))
    chosen = None if backend == "cpp" else backend
    ops.residual_project_grouped_(Gs, Us, Vs, 1.0, U_complement=ucs, V_complement=vcs, backend=chosen)
    once = [G.clone() for G in Gs]
    ops.residual_project_grouped_(Gs, Us, Vs, 1.0, U_complement=ucs, V_complement=vcs, backend=chosen)
    for G, G1 in zip(Gs, once):
        torch.testing.assert_close(G, G1, atol=1e-5, rtol=1e-5)


def test_grouped_projection_forced_cpp_refuses_complement():
    if not cpp.load(jit=True):
        pytest.skip(f"C++ kernels unavailable: {cpp.unavailable_reason()}")
    Gs, Us, Vs, scales, ucs, vcs = make_group(torch.float32, "cpu")
    before = [G.clone() for G in Gs]
    with raises(ValueError, "backend 'cpp' cannot run", "complement"):
        ops.residual_project_grouped_(Gs, Us, Vs, scales, U_complement=ucs, V_complement=vcs, backend="cpp")
    assert all(torch.equal(G, B) for G, B in zip(Gs, before)), "nothing may be written before the error"


def test_grouped_projection_bad_input_names_the_entry():
    G = torch.randn(6, 5)
    V = random_basis(5, 2, torch.float32)
    with raises(TypeError, "Gs", "list or tuple", "Tensor"):
        ops.residual_project_grouped_(G, None, [V])
    with raises(ValueError, "Vs", "expected 2", "got 1"):
        ops.residual_project_grouped_([G, G.clone()], None, [V])
    with raises(ValueError, "Gs[1]", "V", "3 rows", "(5, 2)"):
        ops.residual_project_grouped_([G, torch.randn(4, 3)], None, [V, V])
    with raises(TypeError, "Gs[0]", "scale", "str"):
        ops.residual_project_grouped_([G], None, [V], ["0.5"])
    with raises(ValueError, "Gs[1]", "shares memory with Gs[0]"):
        ops.residual_project_grouped_([G, G], None, [V, V])
    with raises(ValueError, "Gs[1]", "shares memory with Gs[0]"):
        ops.residual_project_grouped_([G, G.T], None, [V, random_basis(6, 2, torch.float32)])
    storage = torch.randn(5, 7)
    V_in_G = storage[:, :2]
    V_in_G.copy_(V)
    with raises(ValueError, "Gs[0]", "shares memory with Vs[0]"):
        ops.residual_project_grouped_([storage.T[2:]], None, [V_in_G])
    with raises(ValueError, "Gs[0]", "2-D"):
        ops.residual_project_grouped_([torch.randn(2, 6, 5)], None, [V])
    with raises(ValueError, "Gs[0]", "overlapping elements"):
        ops.residual_project_grouped_([torch.randn(5, 1).expand(5, 5)], None, [V])


# --- constraint restore -------------------------------------------------------------------------

def restore_case(out_dim, in_dim, k_out, k_in, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W0 = torch.randn(out_dim, in_dim, generator=gen, dtype=torch.float64)
    W = W0 + 0.01 * torch.randn(out_dim, in_dim, generator=gen, dtype=torch.float64)  # after a few steps
    U = None if k_out is None else random_basis(out_dim, k_out, seed=seed + 1)
    V = None if k_in is None else random_basis(in_dim, k_in, seed=seed + 2)
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(W), cast(W0), cast(U), cast(V)


SIDES = {"V": (None, 6), "U": (4, None), "UV": (4, 6), "empty": (0, 0)}


@pytest.mark.parametrize("form", ["anchor", "W0"])
@pytest.mark.parametrize("sides", SIDES.values(), ids=SIDES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restore_matches_oracle_and_holds_the_constraint(backend, dtype, sides, form):
    W, W0, U, V = restore_case(40, 56, *sides, dtype, device_for(backend))
    W_before = W.clone()
    ptr = W.data_ptr()
    kwargs = {"anchor": ops.subspace_anchor(W0, U, V)} if form == "anchor" else {"W0": W0}
    returned = ops.subspace_restore_(W, U, V, backend=backend, **kwargs)
    assert returned is W and W.data_ptr() == ptr
    oracle = as64(W0) + oracles.residual_project_unchecked(as64(W_before) - as64(W0), as64(U), as64(V), 1.0)
    own = oracles.subspace_restore(W_before, W0, U, V)
    assert_close_to_oracle(W, oracle, own, W0.abs().max().item(), dtype)
    # the constraint, to the rounding of W's dtype (W itself is stored rounded)
    D = as64(W) - as64(W0)
    tol = 8 * torch.finfo(dtype).eps * W0.abs().max().item() * max(W.shape) ** 0.5
    if V is not None and V.shape[1]:
        assert (D @ as64(V)).abs().max().item() <= tol
    if U is not None and U.shape[1]:
        assert (as64(U).T @ D).abs().max().item() <= tol


def test_restore_with_the_pre_step_weight_equals_restore_with_w0(backend):
    W, W0, U, V = restore_case(40, 56, 4, 6, torch.float32, device_for(backend))
    W_prev = ops.subspace_restore_(W.clone(), U, V, W0=W0, backend=backend)  # the constraint holds here
    W_step = W_prev + 0.01 * torch.randn_like(W_prev)  # an optimizer step that leaves the subspace
    by_w0 = ops.subspace_restore_(W_step.clone(), U, V, W0=W0, backend=backend)
    by_prev = ops.subspace_restore_(W_step.clone(), U, V, W0=W_prev, backend=backend)
    torch.testing.assert_close(by_prev, by_w0, atol=1e-5, rtol=1e-5)


def test_restore_with_complement_bases(backend):
    dev = device_for(backend)
    W, W0, U, V = restore_case(30, 24, 20, 18, torch.float32, dev)
    Uc = torch.linalg.svd(torch.eye(30, device=dev) - U @ U.T)[0][:, :10]
    Vc = torch.linalg.svd(torch.eye(24, device=dev) - V @ V.T)[0][:, :6]
    expected = oracles.subspace_restore(W, W0, U, V)
    with raises(ValueError, "complement", "W0"):
        ops.subspace_restore_(W.clone(), Uc, Vc, anchor=ops.subspace_anchor(W0, Uc, Vc),
                              U_complement=True, V_complement=True)
    chosen = None if backend == "cpp" else backend
    got = ops.subspace_restore_(W.clone(), Uc, Vc, W0=W0, U_complement=True, V_complement=True, backend=chosen)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_grouped_restore(backend):
    dev = device_for(backend)
    cases = [restore_case(40, 56, *sides, torch.float32, dev, seed=i) for i, sides in enumerate(SIDES.values())]
    Ws = [c[0].clone() for c in cases]
    Us, Vs = [c[2] for c in cases], [c[3] for c in cases]
    anchors = [ops.subspace_anchor(c[1], c[2], c[3]) if i % 2 == 0 else None for i, c in enumerate(cases)]
    W0s = [None if i % 2 == 0 else c[1] for i, c in enumerate(cases)]
    returned = ops.subspace_restore_grouped_(Ws, Us, Vs, W0s=W0s, anchors=anchors, backend=backend)
    assert all(r is W for r, W in zip(returned, Ws))
    for W, (W_before, W0, U, V) in zip(Ws, cases):
        torch.testing.assert_close(W, oracles.subspace_restore(W_before, W0, U, V), atol=1e-5, rtol=1e-5)


def test_restore_bad_input():
    W, W0, U, V = restore_case(8, 6, 2, 3, torch.float32, "cpu")
    anchor = ops.subspace_anchor(W0, U, V)
    with raises(ValueError, "exactly one of W0", "both"):
        ops.subspace_restore_(W, U, V, W0=W0, anchor=anchor)
    with raises(ValueError, "exactly one of W0", "neither"):
        ops.subspace_restore_(W, U, V)
    with raises(ValueError, "anchor.W0V", "(8, 3)", "None"):
        ops.subspace_restore_(W, U, V, anchor=ops.subspace_anchor(W0, U, None))
    with raises(ValueError, "anchor.UtW0", "None", "(2, 6)"):
        ops.subspace_restore_(W, None, V, anchor=anchor)
    with raises(ValueError, "W0", "shape (8, 6)", "(6, 8)"):
        ops.subspace_restore_(W, U, V, W0=W0.T.contiguous())
    with raises(ValueError, "W0 shares memory with W"):
        ops.subspace_restore_(W, U, V, W0=W)
    with raises(ValueError, "Ws[1]", "exactly one of W0"):
        ops.subspace_restore_grouped_([W, W0.clone()], [U, U], [V, V], anchors=[anchor, None])


# --- results never alias inputs (issue: results that alias inputs) -------------------------------

def test_results_are_new_tensors_unless_out_is_given(backend):
    dev = device_for(backend)
    G = torch.randn(6, 5, device=dev)
    for U, V in [(G.new_zeros(6, 0), None), (None, G.new_zeros(5, 0)), (None, None),
                 (G.new_zeros(6, 0), G.new_zeros(5, 0))]:
        result = ops.residual_project(G, U, V, 1.0, backend=backend)
        assert torch.equal(result, G)
        assert result.data_ptr() != G.data_ptr()
        result.add_(1.0)  # writing the result leaves G alone
        assert not torch.equal(result, G)
    for fn in (oracles.residual_project, oracles.residual_project_unchecked):
        args = (G, G.new_zeros(6, 0), None, 1.0)
        assert fn(*args).data_ptr() != G.data_ptr()
    X = torch.randn(3, 5, device=dev)
    assert ops.project_rows(X, X.new_zeros(5, 0), 1.0, backend=backend).data_ptr() != X.data_ptr()


def test_out_overlapping_an_input_is_refused(backend):
    dev = device_for(backend)
    V = random_basis(5, 2, torch.float32).to(dev)
    U = random_basis(5, 2, torch.float32).to(dev)
    square = torch.randn(5, 5, device=dev)
    with raises(ValueError, "out is a different view of G's memory"):
        ops.residual_project(square, U, V, out=square.T, backend=backend)
    wide = torch.randn(5, 9, device=dev)
    with raises(ValueError, "out is a different view of G's memory"):
        ops.residual_project(wide[:, :5], U, V, out=wide[:, 2:7], backend=backend)
    holder = torch.zeros(5, 7, device=dev)
    holder[:, :2] = V
    V_view = holder[:, :2]
    with raises(ValueError, "out shares memory with V"):
        ops.residual_project(square, None, V_view, out=holder[:, 2:], backend=backend)
    with raises(ValueError, "out shares memory with U"):
        ops.residual_project(square, V_view, None, out=holder[:, 2:], backend=backend)
    with raises(ValueError, "out has overlapping elements"):
        ops.residual_project(square, U, V, out=torch.zeros(5, 1, device=dev).expand(5, 5), backend=backend)
    # the in-place form and a disjoint buffer stay allowed
    expected = oracles.residual_project(square, U, V)
    out = torch.empty(5, 5, device=dev)
    ops.residual_project(square, U, V, out=out, backend=backend)
    ops.residual_project(square, U, V, out=square, backend=backend)
    torch.testing.assert_close(square, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_restore_above_the_fused_rank(backend, dtype):
    # k_out + k_in = 140: the C++ kernel switches to whole-matrix BLAS, Triton to cuBLAS + epilogue
    W, W0, U, V = restore_case(150, 160, 10, 130, dtype, device_for(backend))
    W_before = W.clone()
    ops.subspace_restore_(W, U, V, anchor=ops.subspace_anchor(W0, U, V), backend=backend)
    oracle = as64(W0) + oracles.residual_project_unchecked(as64(W_before) - as64(W0), as64(U), as64(V), 1.0)
    assert_close_to_oracle(W, oracle, oracles.subspace_restore(W_before, W0, U, V), W0.abs().max().item(), dtype)


def test_forced_cpp_restore_runs_the_cpp_kernel(monkeypatch):
    if not cpp.load(jit=True):
        pytest.skip(f"C++ kernels unavailable: {cpp.unavailable_reason()}")

    def no_torch(*args, **kwargs):
        raise AssertionError("the torch thin-factor path ran for a forced C++ restore")

    monkeypatch.setattr(torch_backend, "thin_factors", no_torch)
    cases = [restore_case(40, 56, *sides, torch.float32, "cpu", seed=i) for i, sides in enumerate(SIDES.values())]
    Ws = [c[0].clone() for c in cases]
    ops.subspace_restore_grouped_(Ws, [c[2] for c in cases], [c[3] for c in cases],
                                  anchors=[ops.subspace_anchor(c[1], c[2], c[3]) for c in cases], backend="cpp")
    for W, (W_before, W0, U, V) in zip(Ws, cases):
        torch.testing.assert_close(W, oracles.subspace_restore(W_before, W0, U, V), atol=1e-5, rtol=1e-5)


# --- row shards (FSDP2 Shard(0)): UᵀG summed over the shard group between the passes -------------

class ThreadAllReduce:
    """An in-process stand-in for ``dist.all_reduce`` over ``n`` ranks running in threads."""

    def __init__(self, n):
        import threading

        self.n, self.barrier, self.slots = n, threading.Barrier(n, timeout=120), [None] * n

    def for_rank(self, rank):
        def reduce(Ps):
            self.slots[rank] = [P.clone() for P in Ps]
            self.barrier.wait()
            total = [sum(parts) for parts in zip(*self.slots)]
            self.barrier.wait()
            for P, T in zip(Ps, total):
                P.copy_(T)
        return reduce


def _locked(lock, fn, *args, **kwargs):
    with lock:
        return fn(*args, **kwargs)


def run_ranks(n, fn, barrier):
    import threading

    errors = []

    def target(rank):
        try:
            fn(rank)
        except BaseException as exc:  # noqa: BLE001 (re-raised below)
            errors.append(exc)
            barrier.abort()  # the other rank must not wait for this one

    threads = [threading.Thread(target=target, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sharded_projection_and_restore_equal_the_full_ones(backend, dtype, monkeypatch):
    if backend == "cpp":
        pytest.skip("the C++ kernel refuses row shards (tested below)")
    dev = device_for(backend)
    if backend == "triton" and dev == "cpu":  # the Triton interpreter is not thread-safe: one launch at a time
        import threading

        from kplora_kernels.ops import triton_kernels
        lock = threading.Lock()
        for name in ("project_group", "left_products"):
            original = getattr(triton_kernels, name)
            monkeypatch.setattr(triton_kernels, name, lambda *a, _f=original, **k: _locked(lock, _f, *a, **k))
    cases = [restore_case(40, 56, 4, 6, dtype, dev, seed=1), restore_case(40, 56, 3, None, dtype, dev, seed=2),
             restore_case(30, 24, None, 5, dtype, dev, seed=3)]
    grads = [torch.randn(c[0].shape, dtype=torch.float64).to(dtype=dtype, device=dev) for c in cases]
    scales = [0.5, 1.0, 0.25]
    full_G = [G.clone() for G in grads]
    ops.residual_project_grouped_(full_G, [c[2] for c in cases], [c[3] for c in cases], scales, backend=backend)
    full_W = [c[0].clone() for c in cases]
    ops.subspace_restore_grouped_(full_W, [c[2] for c in cases], [c[3] for c in cases],
                                  anchors=[ops.subspace_anchor(c[1], c[2], c[3]) for c in cases], backend=backend)
    rows = [torch.tensor_split(torch.arange(c[0].shape[0]), 2) for c in cases]
    shard = lambda t, i, r: None if t is None else t[rows[i][r]].clone()  # noqa: E731
    results = {}
    reducer = ThreadAllReduce(2)

    def rank(r):
        reduce = reducer.for_rank(r)
        Gs = [shard(G, i, r) for i, G in enumerate(grads)]
        Us = [shard(c[2], i, r) for i, c in enumerate(cases)]
        Vs = [c[3] for c in cases]
        ops.residual_project_grouped_(Gs, Us, Vs, scales, backend=backend, U_reduce=reduce)
        anchors = [ops.subspace_anchor(shard(c[1], i, r), Us[i], Vs[i], U_reduce=reduce) for i, c in enumerate(cases)]
        Ws = [shard(c[0], i, r) for i, c in enumerate(cases)]
        ops.subspace_restore_grouped_(Ws, Us, Vs, anchors=anchors, backend=backend, U_reduce=reduce)
        W2s = [shard(c[0], i, r) for i, c in enumerate(cases)]
        ops.subspace_restore_grouped_(W2s, Us, Vs, W0s=[shard(c[1], i, r) for i, c in enumerate(cases)],
                                      backend=backend, U_reduce=reduce)
        results[r] = (Gs, Ws, W2s)

    run_ranks(2, rank, reducer.barrier)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    for i in range(len(cases)):
        torch.testing.assert_close(torch.cat([results[r][0][i] for r in range(2)]), full_G[i], **tol)
        torch.testing.assert_close(torch.cat([results[r][1][i] for r in range(2)]), full_W[i], **tol)
        torch.testing.assert_close(torch.cat([results[r][2][i] for r in range(2)]), full_W[i], **tol)


def test_sharded_bad_input():
    G, U = torch.randn(6, 5), random_basis(12, 2, torch.float32)[:6]
    with raises(TypeError, "U_reduce", "callable", "str"):
        ops.residual_project_grouped_([G], [U], None, U_reduce="sum")
    with raises(ValueError, "Gs[0]", "row shard", "6 rows", "(5, 2)"):
        ops.residual_project_grouped_([G], [U[:5]], None, U_reduce=lambda Ps: None)
    with raises(ValueError, "U_reduce", "same shapes"):
        ops.residual_project_grouped_([G], [U], None, U_reduce=lambda Ps: [P[:1] for P in Ps])
    if cpp.load(jit=True):
        with raises(ValueError, "backend 'cpp' cannot run", "row shard"):
            ops.residual_project_grouped_([G], [U], None, backend="cpp", U_reduce=lambda Ps: None)


def test_sharded_projection_with_a_complement_v():
    # auto dispatch on CPU: row shards go through the thin-factor form (shared with Triton's general path)
    G, U, V = make_group(torch.float32, "cpu", cases=[(40, 24, 4, 20, False, True)])[:3]
    G, U, V = G[0], U[0], V[0]
    expected = oracles.residual_project(G, U, V, 0.5, V_complement=True)
    halves = torch.tensor_split(torch.arange(40), 2)
    reducer, results = ThreadAllReduce(2), {}

    def rank(r):
        H = G[halves[r]].clone()
        ops.residual_project_grouped_([H], [U[halves[r]].clone()], [V], 0.5, V_complement=True,
                                      U_reduce=reducer.for_rank(r))
        results[r] = H

    run_ranks(2, rank, reducer.barrier)
    torch.testing.assert_close(torch.cat([results[0], results[1]]), expected, atol=1e-5, rtol=1e-5)
