"""Every projection backend against the float64 oracle (tests/oracles.py).

Tolerance (docs/design.md §3): a kernel's error against the float64 oracle may be at most a few times the
reference's own error in the same dtype, plus one rounding of the output.
"""
import os

import pytest
import torch

from helpers import raises, random_basis
from kplora_kernels import ops
import oracles
from kplora_kernels.ops import cpp

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_for(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def make_case(out_dim, in_dim, k_out, k_in, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(out_dim, in_dim, generator=gen, dtype=torch.float64)
    U = None if k_out is None else random_basis(out_dim, k_out, seed=seed + 1)
    V = None if k_in is None else random_basis(in_dim, k_in, seed=seed + 2)
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(G), cast(U), cast(V)


def assert_matches_oracle(result, G, U, V, scale, factor=4.0):
    as64 = lambda t: None if t is None else t.detach().cpu().double()  # noqa: E731
    # the inputs as rounded to their dtype, exactly, in float64 (a rounded basis is only nearly orthonormal)
    oracle = oracles.residual_project_unchecked(as64(G), as64(U), as64(V), scale)
    own = oracles.residual_project(G, U, V, scale)
    assert result.shape == G.shape and result.dtype == G.dtype
    err = (as64(result) - oracle).abs().max().item() if oracle.numel() else 0.0
    ref_err = (as64(own) - oracle).abs().max().item() if oracle.numel() else 0.0
    # the op subtracts terms as large as scale·G: one rounding of those is the floor
    one_rounding = torch.finfo(G.dtype).eps * abs(scale) * (G.abs().max().item() if G.numel() else 0.0)
    assert err <= factor * ref_err + 2 * one_rounding, f"error {err:.3g} vs reference's own {ref_err:.3g}"


SHAPES = [(1, 1), (7, 13), (37, 101), (101, 37), (64, 48)]
SIDES = {"V only": (None, 5), "U only": (3, None), "both": (3, 5), "k_out=0": (0, 5),
         "full U": ("all", 2)}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sides", SIDES.values(), ids=SIDES.keys())
def test_backend_matches_reference_fp32(backend, shape, sides):
    out_dim, in_dim = shape
    k_out, k_in = sides
    k_out = out_dim if k_out == "all" else (None if k_out is None else min(k_out, out_dim))
    k_in = None if k_in is None else min(k_in, in_dim)
    G, U, V = make_case(out_dim, in_dim, k_out, k_in, torch.float32, device_for(backend))
    result = ops.residual_project(G, U, V, 0.7, backend=backend)
    assert_matches_oracle(result, G, U, V, 0.7)
    if U is not None and U.shape[1]:
        assert (U.T @ result).abs().max() < 1e-4
    if V is not None and V.shape[1]:
        assert (result @ V).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_backend_dtypes(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        with raises(ValueError, "triton", "float64"):
            ops.residual_project(torch.randn(4, 4, dtype=dtype, device=device_for(backend)), backend=backend)
        return
    G, U, V = make_case(37, 70, 3, 6, dtype, device_for(backend))
    assert_matches_oracle(ops.residual_project(G, U, V, 1.5, backend=backend), G, U, V, 1.5)


@pytest.mark.parametrize("sides", [(3, None), (None, 5), (3, 5)], ids=["U", "V", "UV"])
def test_in_place_and_out(backend, sides):
    G, U, V = make_case(45, 38, *sides, torch.float32, device_for(backend))
    expected = ops.residual_project(G, U, V, 0.5, backend="torch")
    H = G.clone()
    ptr = H.data_ptr()
    returned = ops.residual_project(H, U, V, 0.5, out=H, backend=backend)
    assert returned.data_ptr() == ptr
    torch.testing.assert_close(H, expected, atol=1e-5, rtol=1e-5)
    out = torch.empty_like(G)
    ops.residual_project(G, U, V, 0.5, out=out, backend=backend)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_non_contiguous_and_batched(backend):
    dev = device_for(backend)
    base = torch.randn(40, 66, device=dev)
    G = base.T[::2]  # 33×40, strided and transposed
    _, U, V = make_case(33, 40, 4, 6, torch.float32, dev)
    assert not G.is_contiguous()
    assert_matches_oracle(ops.residual_project(G, U, V, 1.0, backend=backend), G, U, V, 1.0)
    in_place = G.clone().T.contiguous().T  # a column-major G, projected in place
    ops.residual_project(in_place, U, V, 1.0, out=in_place, backend=backend)
    torch.testing.assert_close(in_place, oracles.residual_project(G, U, V), atol=1e-5, rtol=1e-5)
    Gb = torch.randn(3, 33, 40, device=dev)
    assert_matches_oracle(ops.residual_project(Gb, U, V, 2.0, backend=backend), Gb, U, V, 2.0)


def test_scale_is_linear_and_no_bases_only_scales(backend):
    G, U, V = make_case(20, 30, 2, 3, torch.float32, device_for(backend))
    one = ops.residual_project(G, U, V, 1.0, backend=backend)
    torch.testing.assert_close(ops.residual_project(G, U, V, -0.25, backend=backend), -0.25 * one)
    torch.testing.assert_close(ops.residual_project(G, None, None, 3.0, backend=backend), 3.0 * G)
    empty = G.new_zeros(30, 0)
    torch.testing.assert_close(ops.residual_project(G, None, empty, 2.0, backend=backend), 2.0 * G)


def test_complement_bases(backend):
    dev = device_for(backend)
    G, U, V = make_case(30, 24, 20, 18, torch.float32, dev)  # bases over half their space
    Uc = torch.linalg.svd(torch.eye(30, device=dev) - U @ U.T)[0][:, :10]
    Vc = torch.linalg.svd(torch.eye(24, device=dev) - V @ V.T)[0][:, :6]
    expected = ops.residual_project(G, U, V, 0.5, backend="torch")
    if backend == "cpp":  # the C++ kernel applies I − BBᵀ only: forced, it says so (no silent torch)
        with raises(ValueError, "backend 'cpp' cannot run", "complement"):
            ops.residual_project(G, Uc, Vc, 0.5, backend=backend, U_complement=True, V_complement=True)
        backend = None  # auto-dispatch takes the complement through torch's thin products
    for uc, vc in [(True, True), (True, False), (False, True)]:
        result = ops.residual_project(G, Uc if uc else U, Vc if vc else V, 0.5, backend=backend,
                                      U_complement=uc, V_complement=vc)
        torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)
        H = G.clone()
        ops.residual_project(H, Uc if uc else U, Vc if vc else V, 0.5, out=H, backend=backend,
                             U_complement=uc, V_complement=vc)
        torch.testing.assert_close(H, expected, atol=1e-5, rtol=1e-5)
    kept_nothing = ops.residual_project(G, None, V.new_zeros(24, 0), 1.0, backend=backend, V_complement=True)
    assert torch.equal(kept_nothing, torch.zeros_like(G))


@pytest.mark.parametrize("shape", [(5,), (4, 9), (2, 3, 9)], ids=str)
def test_project_rows(backend, shape):
    dev = device_for(backend)
    X = torch.randn(*shape, device=dev)
    V = random_basis(shape[-1], min(3, shape[-1]), torch.float32).to(dev)
    result = ops.project_rows(X, V, 0.3, backend=backend)
    expected = oracles.project_rows(X.double(), V.double(), 0.3)
    assert result.shape == X.shape
    torch.testing.assert_close(result.double(), expected, atol=1e-5, rtol=1e-5)


def test_cpp_extension_is_built_when_required():
    if os.environ.get("KPLORA_REQUIRE_CPP") != "1":
        pytest.skip("KPLORA_REQUIRE_CPP is not set (make test sets it)")
    assert cpp.load(), f"C++ kernels were not built: {cpp.unavailable_reason()}"
    assert ops.resolve_backend(torch.zeros(2, 2), None) == "cpp"


def test_dispatch_and_backend_errors(monkeypatch):
    G = torch.randn(6, 5)
    with raises(ValueError, "backend", "'cuda'"):
        ops.residual_project(G, backend="cuda")
    with raises(ValueError, "cpp", "meta"):
        ops.resolve_backend(torch.empty(2, 2, device="meta"), "cpp")
    monkeypatch.setenv("KPLORA_BACKEND", "torch")
    assert ops.resolve_backend(G, None) == "torch"
    monkeypatch.setenv("KPLORA_BACKEND", "nope")
    with raises(ValueError, "nope"):
        ops.residual_project(G)


@pytest.mark.parametrize("backend_name", ["torch", "cpp", "triton"])
def test_validation_precedes_every_backend(backend_name):
    G = torch.randn(6, 5)
    with raises(ValueError, "V", "5 rows", "(6, 2)"):
        ops.residual_project(G, None, random_basis(6, 2, torch.float32), backend=backend_name)
    with raises(ValueError, "out", "(6, 5)", "(5, 6)"):
        ops.residual_project(G, out=torch.empty(5, 6), backend=backend_name)
    with raises(ValueError, "out", "torch.float64"):
        ops.residual_project(G, out=torch.empty(6, 5, dtype=torch.float64), backend=backend_name)
    with raises(TypeError, "X", "torch.int32"):
        ops.project_rows(torch.ones(3, 5, dtype=torch.int32), random_basis(5, 2, torch.float32),
                         backend=backend_name)


def test_cpp_op_under_torch_compile():
    if not cpp.load(jit=True):
        pytest.skip(f"C++ kernels unavailable: {cpp.unavailable_reason()}")
    G, U, V = make_case(24, 16, 3, 4, torch.float32, "cpu")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(G, U, V):
        P = torch.ops.kplora.residual_project(G, U, V, 0.5)
        rows = torch.ops.kplora.project_rows(G, V, 1.0)
        return P * 2.0 + rows

    expected = 2.0 * oracles.residual_project(G, U, V, 0.5) + oracles.project_rows(G, V)
    torch.testing.assert_close(step(G, U, V), expected, atol=1e-5, rtol=1e-5)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def in_place(H, U, V):
        torch.ops.kplora.residual_project_(H, U, V, 0.5)
        return H

    H = G.clone()
    torch.testing.assert_close(in_place(H, U, V), oracles.residual_project(G, U, V, 0.5), atol=1e-5, rtol=1e-5)
