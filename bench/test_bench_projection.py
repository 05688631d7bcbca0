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
from kplora_kernels.ops import cpp, torch_backend

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
        fn = lambda: torch_backend.residual_project(G, U, V, SCALE)  # noqa: E731
    elif method == "B_dense":
        eye = lambda n: torch.eye(n, device=DEVICE, dtype=DTYPE)  # noqa: E731
        left = eye(out_dim) - U @ U.T if U is not None else None
        right = eye(in_dim) - V @ V.T
        fn = lambda: ((left @ G if left is not None else G) @ right) * SCALE  # noqa: E731
    elif method == "C_addmm":
        def fn():
            _, L, R = torch_backend.thin_factors(G, U, V)
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
    expected = torch_backend.residual_project(G.double(), None if U is None else U.double(),
                                                    V.double(), 1.0 if method == "ours_inplace" else SCALE)
    tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-3
    torch.testing.assert_close(result.double(), expected, atol=tol, rtol=tol)


# --- full fine-tuning in the residual subspace: a LLaMA-7B-shaped layer's seven weights ----------
#
# Every step projects every target gradient in place (ops.residual_project_grouped_) and, after the
# optimizer step, restores the constraint (ops.subspace_restore_grouped_). Baselines for the
# grouped projection, in place like ours: the obvious torch composition `g.sub_((g@V)@V.T).mul_(s)`
# per weight, and `g.addmm_(g@V, V.T, beta=s, alpha=-s)` with the thin factors (the CPU FLOP floor).
# Scale 1 in the timed loops: repeated calls then keep the values (a projection is idempotent).
# The whole protected step (projection + AdamW + restore) is reported as a multiple of a plain
# AdamW step: at large k_in the projection is compute-bound and costs what it costs.

if FULL:
    LAYER = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
             "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}
else:
    LAYER = {"q": (64, 64), "k": (64, 64), "v": (64, 64), "o": (64, 64),
             "gate": (172, 64), "up": (172, 64), "down": (64, 172)}
K_RULES = {"k64": lambda n: min(64, n // 8) if not FULL else 64, "in4": lambda n: n // 4, "in2": lambda n: n // 2}
LAYER_ROUNDS = {"k64": 3, "in4": 2, "in2": 2} if FULL else {"k64": 1, "in4": 1, "in2": 1}  # in/2: ~20 s a call on 2 cores


def layer_state(rule, dtype=DTYPE):
    """Gradients, weights and input-side bases of the seven weights; bases up to half the input
    space are stored as themselves (past half the complement would be stored, docs/design.md §1)."""
    gen = torch.Generator().manual_seed(0)
    Gs, Ws, Vs = [], [], []
    bases = {}
    for out_dim, in_dim in LAYER.values():
        Gs.append(torch.randn(out_dim, in_dim, generator=gen).to(device=DEVICE, dtype=dtype))
        Ws.append(torch.randn(out_dim, in_dim, generator=gen).to(device=DEVICE, dtype=dtype) * 0.02)
        if in_dim not in bases:  # q, k, v, o, gate, up share one input size; one basis per layer input
            bases[in_dim] = basis(in_dim, K_RULES[rule](in_dim), gen).to(dtype)
        Vs.append(bases[in_dim])
    return Gs, Ws, Vs


def composition_(Gs, Vs, s):
    for G, V in zip(Gs, Vs):
        G.sub_((G @ V) @ V.T).mul_(s)


def addmm_(Gs, Vs, s):
    for G, V in zip(Gs, Vs):
        G.addmm_(G @ V, V.T, beta=s, alpha=-s)


@pytest.mark.parametrize("method", ["composition", "addmm_inplace", "ours_grouped_inplace"])
@pytest.mark.parametrize("rule", K_RULES)
def test_layer_grouped_projection(benchmark, rule, method):
    if method.startswith("ours") and BACKEND == "cpp" and not cpp.load(jit=True):
        pytest.skip(f"C++ kernels unavailable: {cpp.unavailable_reason()}")
    Gs, _, Vs = layer_state(rule)
    originals = [G.clone() for G in Gs] if not FULL else None
    benchmark.group = f"llama-layer grouped projection k_in={rule} {DTYPE}".replace("torch.", "")
    benchmark.extra_info["method"] = method
    run = {"composition": lambda: composition_(Gs, Vs, 1.0), "addmm_inplace": lambda: addmm_(Gs, Vs, 1.0),
           "ours_grouped_inplace": lambda: ops.residual_project_grouped_(Gs, None, Vs, 1.0, backend=BACKEND)}[method]

    def timed():
        run()
        sync()

    benchmark.pedantic(timed, rounds=LAYER_ROUNDS[rule], iterations=1, warmup_rounds=0)
    if originals is not None:  # quick size: every method is the projection
        for G, G0, V in zip(Gs, originals, Vs):
            expected = torch_backend.residual_project(G0.double(), None, V.double(), 1.0)
            torch.testing.assert_close(G.double(), expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("method", ["plain_adamw", "ours_protected_step"])
@pytest.mark.parametrize("rule", K_RULES)
def test_layer_protected_step(benchmark, rule, method):
    """One AdamW step on the seven weights, plain or protected (projection + step + restore)."""
    if method.startswith("ours") and BACKEND == "cpp" and not cpp.load(jit=True):
        pytest.skip(f"C++ kernels unavailable: {cpp.unavailable_reason()}")
    Gs, Ws, Vs = layer_state(rule)
    params = [torch.nn.Parameter(W) for W in Ws]
    anchors = [ops.subspace_anchor(p.detach(), None, V) for p, V in zip(params, Vs)]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    benchmark.group = f"llama-layer AdamW step k_in={rule} {DTYPE}".replace("torch.", "")
    benchmark.extra_info["method"] = method

    def step():
        for p, G in zip(params, Gs):
            p.grad = G.clone()  # a fresh gradient, as a backward would leave (both methods)
        if method == "ours_protected_step":
            ops.residual_project_grouped_([p.grad for p in params], None, Vs, 1.0, backend=BACKEND)
        optimizer.step()
        if method == "ours_protected_step":
            with torch.no_grad():
                ops.subspace_restore_grouped_([p.detach() for p in params], None, Vs, anchors=anchors,
                                              backend=BACKEND)
        sync()

    benchmark.pedantic(step, rounds=LAYER_ROUNDS[rule], iterations=1, warmup_rounds=1)
    if method == "ours_protected_step":  # the constraint holds after the steps
        for p, a, V in zip(params, anchors, Vs):
            drift = (p.detach().double() @ V.double() - a.W0V.double()).abs().max().item()
            assert drift <= 1e-4 * max(1.0, a.W0V.abs().max().item()), drift
