"""Residual projection ``s·(I−UUᵀ) G (I−VVᵀ)``: our kernels against three torch formulations.

(A) the obvious composition (one side, then the other, then the scale) = the reference;
(B) dense projector matrices ``(I−UUᵀ) @ G @ (I−VVᵀ)``, as the authors' code does;
(C) the best single-``addmm`` formulation ``addmm(G, L, R, beta=s, alpha=−s)`` of the thin factors;
``limit_copy``: one read and one write of ``G`` into a preallocated buffer, the physical limit of a
fused pass; ``limit_copy/ours`` in the summary is the fraction of that limit achieved.
CPU: fp32 through the C++ kernel. GPU (when present): bf16 through the Triton kernel.
Full sizes with ``KPLORA_BENCH_FULL=1`` (``make bench``); quick sizes otherwise.
"""
import pytest
import torch

from bench_sizes import FULL
from kplora_kernels import ops
from kplora_kernels.ops import cpp, reference

SIZES = [(768, 768), (4096, 4096), (4096, 11008)] if FULL else [(96, 128)]
RANKS = [64, 256, 1024] if FULL else [8, 32]
DENSE_MAX = 4096  # (B) forms in×in and out×out projectors: beyond this it takes minutes per call
SCALE = 0.5

if torch.cuda.is_available():
    DEVICE, DTYPE, BACKEND = "cuda", torch.bfloat16, "triton"
else:
    DEVICE, DTYPE, BACKEND = "cpu", torch.float32, "cpp"


def basis(dim, k, gen):
    Q, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen))
    return Q.to(device=DEVICE, dtype=DTYPE)


def cases():
    for out_dim, in_dim in SIZES:
        for k in RANKS:
            if 2 * k > min(out_dim, in_dim):
                continue  # past half the space, the complement basis is the one to store
            for sides in ("V", "UV"):
                yield pytest.param(out_dim, in_dim, k, sides, id=f"{out_dim}x{in_dim}-k{k}-{sides}")


METHODS = ["A_composition", "B_dense", "C_addmm", "limit_copy", "ours", "ours_inplace"]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("out_dim,in_dim,k,sides", list(cases()))
def test_residual_project(benchmark, out_dim, in_dim, k, sides, method):
    if method.startswith("ours") and BACKEND == "cpp" and not cpp.load(jit=True):
        pytest.skip(f"C++ kernels unavailable: {cpp.unavailable_reason()}")
    if method == "B_dense" and max(out_dim, in_dim) > DENSE_MAX:
        pytest.skip(f"dense projectors of {max(out_dim, in_dim)}² take minutes per call here")
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(out_dim, in_dim, generator=gen).to(device=DEVICE, dtype=DTYPE)
    U = basis(out_dim, k, gen) if "U" in sides else None
    V = basis(in_dim, k, gen)
    benchmark.group = f"project {out_dim}x{in_dim} k={k} {sides} {DTYPE}".replace("torch.", "")
    benchmark.extra_info["method"] = method

    if method == "A_composition":
        fn = lambda: reference.residual_project_unchecked(G, U, V, SCALE)  # noqa: E731
    elif method == "B_dense":
        eye = lambda n: torch.eye(n, device=DEVICE, dtype=DTYPE)  # noqa: E731
        left = eye(out_dim) - U @ U.T if U is not None else None
        right = eye(in_dim) - V @ V.T
        fn = lambda: ((left @ G if left is not None else G) @ right) * SCALE  # noqa: E731
    elif method == "C_addmm":
        def fn():
            L, R = reference.low_rank_factors(G, U, V)
            return torch.addmm(G, L, R, beta=SCALE, alpha=-SCALE)
    elif method == "limit_copy":
        buffer = torch.empty_like(G)
        fn = lambda: buffer.copy_(G)  # noqa: E731
    elif method == "ours":
        fn = lambda: ops.residual_project(G, U, V, SCALE, backend=BACKEND)  # noqa: E731
    else:  # in place, scale 1 so that repeated calls keep the values (projection is idempotent)
        H = G.clone()
        fn = lambda: ops.residual_project(H, U, V, 1.0, out=H, backend=BACKEND)  # noqa: E731

    def run():
        result = fn()
        sync()
        return result

    result = benchmark(run)
    if method == "limit_copy":
        return
    expected = reference.residual_project_unchecked(G.double(), None if U is None else U.double(),
                                                    V.double(), 1.0 if method == "ours_inplace" else SCALE)
    tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-3
    torch.testing.assert_close(result.double(), expected, atol=tol, rtol=tol)
