"""Properties of the reference mathematics (float64 unless stated)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import raises, random_basis
from kplora_kernels import (LinearOperator, energy_rank, gpm_expand, layer_scales, principal_subspace,
                            project_rows, randomized_svd, residual_project, set_orthonormality_check)

dims = st.integers(1, 24)


@st.composite
def projection_case(draw):
    out_dim, in_dim = draw(dims), draw(dims)
    k_out = draw(st.one_of(st.none(), st.integers(0, out_dim)))
    k_in = draw(st.one_of(st.none(), st.integers(0, in_dim)))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(out_dim, in_dim, generator=gen, dtype=torch.float64)
    U = None if k_out is None else random_basis(out_dim, k_out, seed=seed + 1)
    V = None if k_in is None else random_basis(in_dim, k_in, seed=seed + 2)
    return G, U, V


def dense_projector(B, dim):
    I = torch.eye(dim, dtype=torch.float64)
    return I if B is None else I - B @ B.T


@settings(max_examples=60, deadline=None)
@given(projection_case(), st.floats(-3, 3))
def test_residual_project_properties(case, scale):
    G, U, V = case
    P = residual_project(G, U, V, 1.0)
    torch.testing.assert_close(residual_project(P, U, V, 1.0), P, atol=1e-12, rtol=0)  # idempotent
    if U is not None:
        torch.testing.assert_close(U.T @ P, torch.zeros(U.shape[1], G.shape[1], dtype=G.dtype),
                                   atol=1e-12, rtol=0)
    if V is not None:
        torch.testing.assert_close(P @ V, torch.zeros(G.shape[0], V.shape[1], dtype=G.dtype),
                                   atol=1e-12, rtol=0)
    dense = dense_projector(U, G.shape[0]) @ G @ dense_projector(V, G.shape[1])
    torch.testing.assert_close(P, dense, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(residual_project(G, U, V, scale), scale * P, atol=1e-12, rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(projection_case())
def test_complement_bases_give_the_same_projection(case):
    G, U, V = case
    full = lambda B, d: torch.linalg.qr(torch.cat([B, torch.randn(d, d, dtype=torch.float64)], 1))[0]
    Uc = None if U is None else full(U, U.shape[0])[:, U.shape[1]:]
    Vc = None if V is None else full(V, V.shape[0])[:, V.shape[1]:]
    torch.testing.assert_close(residual_project(G, Uc, Vc, 0.5, U_complement=True, V_complement=True),
                               residual_project(G, U, V, 0.5), atol=1e-12, rtol=1e-12)


def test_residual_project_batched_and_dtype():
    G = torch.randn(3, 5, 7, dtype=torch.float64)
    U, V = random_basis(5, 2), random_basis(7, 3)
    batched = residual_project(G, U, V, 2.0)
    for b in range(3):
        torch.testing.assert_close(batched[b], residual_project(G[b], U, V, 2.0))
    assert residual_project(G.float(), U, V).dtype == torch.float32
    assert residual_project(G).data_ptr() != G.data_ptr()  # always a new tensor


def test_project_rows_matches_residual_project():
    X = torch.randn(2, 6, 9, dtype=torch.float64)
    V = random_basis(9, 4)
    expected = residual_project(X.reshape(-1, 9), None, V, 0.3).reshape(X.shape)
    torch.testing.assert_close(project_rows(X, V, 0.3), expected)
    torch.testing.assert_close(project_rows(X, V) @ V, torch.zeros(2, 6, 4, dtype=torch.float64),
                               atol=1e-12, rtol=0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 10), min_size=1, max_size=20), st.floats(1e-3, 1.0))
def test_energy_rank_against_brute_force(values, eps):
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    # running sums in one order (as the rule accumulates them): sums of the same numbers in another
    # order round differently, and at eps = 1 with trailing zeros that alone changes the answer
    partial = [0.0]
    for v in s.tolist():
        partial.append(partial[-1] + v * v)
    total = partial[-1]
    brute = 0
    if total > 0:
        brute = next(p for p in range(1, len(values) + 1) if partial[p] >= eps * total)
    assert energy_rank(s, eps) == brute
    assert energy_rank(s, eps, authors_compat=True) == max(brute - 1, 0)


def test_energy_rank_edges():
    assert energy_rank(torch.tensor([3.0, 4.0 / 3]), 1.0) == 2
    assert energy_rank(torch.tensor([3.0, 0.0, 0.0]), 1.0) == 1
    assert energy_rank(torch.zeros(4), 0.5) == 0
    assert energy_rank(torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0]), 0.5) == 1  # 4/8 reaches 0.5 exactly


def known_spectrum(out_dim, in_dim, sigma, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = len(sigma)
    Uo, _ = torch.linalg.qr(torch.randn(out_dim, k, generator=gen, dtype=torch.float64))
    Vo, _ = torch.linalg.qr(torch.randn(in_dim, k, generator=gen, dtype=torch.float64))
    return Uo @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ Vo.T, Uo, Vo


def test_principal_subspace_known_spectrum():
    W, Uo, Vo = known_spectrum(12, 9, [4.0, 3.0, 2.0, 1.0])  # energies 16, 9, 4, 1 of 30
    V = principal_subspace(W, 0.8, side="in")  # 25/30 = 0.83 ≥ 0.8 → 2 directions
    U = principal_subspace(W, 0.8, side="out")
    assert V.shape == (9, 2) and U.shape == (12, 2)
    torch.testing.assert_close(V @ V.T, Vo[:, :2] @ Vo[:, :2].T)
    torch.testing.assert_close(U @ U.T, Uo[:, :2] @ Uo[:, :2].T)
    assert principal_subspace(W, 1.0).shape == (9, 4)
    assert principal_subspace(W.float(), 0.5).dtype == torch.float32


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
@pytest.mark.parametrize("side", ["in", "out"])
def test_principal_subspace_gram_route_matches_svd(shape, side):
    W, _, _ = known_spectrum(*shape, [2.0 ** -i for i in range(20)])
    W = W + 1e-6 * torch.randn(*shape, dtype=torch.float64)
    for eps in (0.6, 0.9, 0.999):
        exact = principal_subspace(W, eps, side, method="svd")
        gram = principal_subspace(W, eps, side, method="gram")
        assert gram.shape == exact.shape
        torch.testing.assert_close(gram @ gram.T, exact @ exact.T, atol=1e-8, rtol=0)


def planted_inputs(n, dim, k, noise, seed=0):
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen, dtype=torch.float64))
    signal = torch.randn(n, k, generator=gen, dtype=torch.float64) * torch.linspace(5, 3, k, dtype=torch.float64)
    return signal @ basis.T + noise * torch.randn(n, dim, generator=gen, dtype=torch.float64), basis


def test_gpm_expand_recovers_planted_subspace_and_stops_at_threshold():
    X, basis = planted_inputs(400, 20, 4, noise=0.01)
    V = gpm_expand(None, X, 0.99)
    assert V.shape == (20, 4)
    torch.testing.assert_close(V @ V.T, basis @ basis.T, atol=1e-3, rtol=0)
    # the rule: the kept count is the smallest reaching the threshold
    s = torch.linalg.svdvals(X)
    assert V.shape[1] == energy_rank(s, 0.99)
    # expanding again with the same data adds nothing: the energy is already captured
    assert gpm_expand(V, X, 0.99).shape == (20, 4)
    # a second task in a new direction is appended, orthonormal to the first
    Y, basis2 = planted_inputs(400, 20, 2, noise=0.01, seed=1)
    Y = Y - (Y @ V) @ V.T
    V2 = gpm_expand(V, Y, 0.99)
    assert V2.shape[1] == 6
    torch.testing.assert_close(V2[:, :4], V)
    torch.testing.assert_close(V2.T @ V2, torch.eye(6, dtype=torch.float64), atol=1e-10, rtol=0)


def test_gpm_expand_counts_energy_already_captured():
    X, basis = planted_inputs(300, 10, 3, noise=0.0)
    V = basis[:, :2].contiguous()
    captured = ((X @ V) ** 2).sum() / (X ** 2).sum()
    assert gpm_expand(V, X, float(captured) * 0.999).shape[1] == 2  # threshold already met
    assert gpm_expand(V, X, 1.0).shape[1] == 3


def test_gpm_expand_never_exceeds_dim():
    X = torch.randn(50, 6, dtype=torch.float64)
    V = gpm_expand(None, X, 1.0)
    assert V.shape == (6, 6)
    assert gpm_expand(V, X, 1.0).shape == (6, 6)


def decaying(m, n, seed=0, rate=0.7):
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    Uo, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    Vo, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return Uo @ torch.diag(rate ** torch.arange(k, dtype=torch.float64)) @ Vo.T


@pytest.mark.parametrize("shape", [(60, 40), (30, 90)])
def test_randomized_svd_captures_top_energy(shape):
    A = decaying(*shape)
    rank = 8
    U, S, Vh = randomized_svd(A, rank, generator=torch.Generator().manual_seed(1))
    exact = torch.linalg.svdvals(A)[:rank].pow(2).sum()
    captured = (A @ Vh.T).pow(2).sum()
    assert captured >= 0.99 * exact
    torch.testing.assert_close(U.T @ U, torch.eye(rank, dtype=torch.float64), atol=1e-10, rtol=0)


def test_randomized_svd_exact_on_low_rank_and_through_an_operator():
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(50, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, 40, generator=gen, dtype=torch.float64)
    U, S, Vh = randomized_svd(A, 5)
    torch.testing.assert_close(S, torch.linalg.svdvals(A)[:5])
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, A)
    op = LinearOperator(shape=(50, 40), matmat=lambda M: A @ M, rmatmat=lambda M: A.T @ M, dtype=torch.float64)
    _, S_op, _ = randomized_svd(op, 5)
    torch.testing.assert_close(S_op, S)


def test_randomized_svd_runs_in_fp32_under_autocast():
    A = decaying(40, 30).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        U, S, Vh = randomized_svd(A, 4)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32


def test_layer_scales():
    assert layer_scales(1) == [1.0]
    lin = layer_scales(12)
    assert lin[0] == pytest.approx(0.2) and lin[-1] == pytest.approx(1.0)
    assert lin[6] == pytest.approx(0.2 + 0.8 * 6 / 11)
    assert layer_scales(4, schedule="constant") == [1.0] * 4
    cos = layer_scales(5, schedule="cosine")
    assert cos[0] == pytest.approx(0.2) and cos[2] == pytest.approx(0.6) and cos[-1] == pytest.approx(1.0)
    exp = layer_scales(3, gamma=0.25, schedule="exponential")
    assert exp == pytest.approx([0.25, 0.5, 1.0])
    for sched in ("linear", "cosine", "exponential"):
        values = layer_scales(7, schedule=sched)
        assert all(a <= b for a, b in zip(values, values[1:]))


# --- validation ------------------------------------------------------------------------------

def test_validation_messages():
    G = torch.randn(6, 5)
    U, V = random_basis(6, 2, torch.float32), random_basis(5, 2, torch.float32)
    with raises(ValueError, "G", "2", "(5,)"):
        residual_project(torch.randn(5), None, V)
    with raises(TypeError, "G", "torch.int64"):
        residual_project(torch.ones(6, 5, dtype=torch.long))
    with raises(TypeError, "G", "ndarray"):
        residual_project(G.numpy())
    with raises(ValueError, "V", "5 rows", "(6, 2)"):
        residual_project(G, None, U)
    with raises(ValueError, "U", "6 rows", "(5, 2)"):
        residual_project(G, V, None)
    with raises(ValueError, "V", "orthonormal"):
        residual_project(G, None, 2 * V)
    with raises(ValueError, "V", "meta", "G", "cpu"):
        residual_project(G, None, torch.empty(5, 2, device="meta"))
    with raises(TypeError, "scale"):
        residual_project(G, U, V, scale="1")
    with raises(ValueError, "scale", "nan"):
        residual_project(G, U, V, scale=math.nan)
    with raises(ValueError, "V", "7 columns"):
        residual_project(G, None, torch.randn(5, 7))
    with raises(ValueError, "V", "X.shape[-1]", "(5, 2)"):
        project_rows(torch.randn(3, 4), V)
    with raises(TypeError, "V", "None"):
        project_rows(torch.randn(3, 4), None)
    for bad in (0.0, 1.5, -0.1):
        with raises(ValueError, "eps", str(bad)):
            principal_subspace(G, bad)
    with raises(TypeError, "eps"):
        energy_rank(torch.ones(3), "0.5")
    with raises(ValueError, "side"):
        principal_subspace(G, 0.5, side="left")
    with raises(ValueError, "method"):
        principal_subspace(G, 0.5, method="lanczos")
    with raises(ValueError, "descending"):
        energy_rank(torch.tensor([1.0, 2.0]), 0.5)
    with raises(ValueError, "non-negative"):
        energy_rank(torch.tensor([1.0, -2.0]), 0.5)
    with raises(ValueError, "V", "X.shape[-1]"):
        gpm_expand(U, torch.randn(4, 5), 0.9)
    with raises(ValueError, "rank", "min(m, n) = 5"):
        randomized_svd(G, 6)
    with raises(ValueError, "num_layers"):
        layer_scales(0)
    with raises(ValueError, "gamma"):
        layer_scales(3, gamma=0.0)
    with raises(ValueError, "schedule"):
        layer_scales(3, schedule="step")


def test_orthonormality_check_can_be_switched_off():
    G, V = torch.randn(4, 5), 2 * random_basis(5, 2, torch.float32)
    previous = set_orthonormality_check(False)
    try:
        residual_project(G, None, V)  # accepted: the caller vouches for the basis
    finally:
        set_orthonormality_check(previous)
    with pytest.raises(ValueError):
        residual_project(G, None, V)


# --- non-finite and malformed inputs to the subspace functions -------------------------------------

def test_subspace_functions_refuse_non_finite_inputs_naming_them():
    nan, inf = float("nan"), float("inf")
    with raises(ValueError, "singular_values", "NaN or Inf"):
        energy_rank(torch.tensor([3.0, nan, 1.0]), 0.5)
    with raises(ValueError, "singular_values", "NaN or Inf"):
        energy_rank(torch.tensor([inf, 1.0]), 0.5)
    for method in ("svd", "gram"):
        W = torch.randn(6, 5)
        W[2, 3] = inf
        with raises(ValueError, "W", "NaN or Inf"):
            principal_subspace(W, 0.9, method=method)
        W[2, 3] = nan
        with raises(ValueError, "W", "NaN or Inf"):
            principal_subspace(W, 0.9, method=method)
    X = torch.randn(20, 6)
    X[4, 1] = nan
    with raises(ValueError, "X", "NaN or Inf"):
        gpm_expand(None, X, 0.9)
    A = torch.randn(8, 6)
    A[0, 0] = inf
    with raises(ValueError, "A", "NaN or Inf"):
        randomized_svd(A, 2)


def test_large_finite_weights_do_not_overflow_the_gram_route():
    W, _, _ = known_spectrum(40, 30, [4.0, 3.0, 2.0, 1.0])
    big = (W * 1e20).float()  # finite in fp32; its Gram matrix would not be
    for side in ("in", "out"):
        ref = principal_subspace(W, 0.8, side, method="svd")
        got = principal_subspace(big, 0.8, side, method="gram")
        assert got.shape == ref.shape
        torch.testing.assert_close((got @ got.T).double(), ref @ ref.T, atol=1e-5, rtol=0)
    V = gpm_expand(None, big.T.contiguous(), 0.8)  # inputs near 1e20: the energies are ratios
    assert V.shape == (40, 2)


def test_linear_operator_products_are_checked():
    A = torch.randn(9, 7, dtype=torch.float64)
    wrong = LinearOperator(shape=(9, 7), matmat=lambda M: (A @ M)[:-1], rmatmat=lambda M: A.T @ M,
                           dtype=torch.float64)
    with raises(ValueError, "A.matmat", "(9, ", "(8, "):
        randomized_svd(wrong, 2)
    wrong_r = LinearOperator(shape=(9, 7), matmat=lambda M: A @ M, rmatmat=lambda M: (A.T @ M)[:, :-1],
                             dtype=torch.float64)
    with raises(ValueError, "A.rmatmat", "(7, 7)", "(7, 6)"):
        randomized_svd(wrong_r, 2, n_iter=1)
    nan_op = LinearOperator(shape=(9, 7), matmat=lambda M: A @ M * float("nan"), rmatmat=lambda M: A.T @ M,
                            dtype=torch.float64)
    with raises(ValueError, "A.matmat", "NaN or Inf"):
        randomized_svd(nan_op, 2)
    not_tensor = LinearOperator(shape=(9, 7), matmat=lambda M: (A @ M).numpy(), rmatmat=lambda M: A.T @ M,
                                dtype=torch.float64)
    with raises(TypeError, "A.matmat", "ndarray"):
        randomized_svd(not_tensor, 2)
    with raises(ValueError, "A.shape", "(9,)"):
        randomized_svd(LinearOperator(shape=(9,), matmat=None, rmatmat=None), 2)


@pytest.mark.parametrize("n", [400, 12], ids=["tokens ≥ features", "fewer tokens than features"])
def test_gpm_expand_matches_the_full_svd_rule(n):
    """The one GPM implementation against the rule applied to a full SVD of the residual (the oracle)."""
    X, _ = planted_inputs(n, 20, 6, noise=0.05, seed=4)
    V0 = random_basis(20, 3, seed=6)
    R = X - (X @ V0) @ V0.T
    _, s, Vh = torch.linalg.svd(R, full_matrices=False)
    E, captured = float((X ** 2).sum()), float((X ** 2).sum() - (R ** 2).sum())
    for eps in (0.5, 0.9, 0.99):
        before = captured + torch.cumsum(s * s, 0) - s * s
        count = int((before / E < eps).sum())
        V = gpm_expand(V0, X, eps)
        assert V.shape[1] == 3 + count
        torch.testing.assert_close(V[:, 3:] @ V[:, 3:].T, Vh[:count].T @ Vh[:count], atol=1e-8, rtol=0)
