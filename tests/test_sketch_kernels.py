"""The Triton sketch-update kernel (``kplora_kernels.ops.sketch_triton``) against the float64 oracle.

Runs on CUDA when present, else under ``TRITON_INTERPRET=1`` (set in the root conftest) at small
shapes whose feature widths span several blocks. Tolerance (docs/design.md §3): the kernel's error
against float64 may be at most 4× the error of the same computation done by torch in the input
dtype (two GEMMs, the test matrices cast to that dtype), plus a floor of a few fp32 roundings.
"""
import pytest
import torch

from helpers import random_basis

triton = pytest.importorskip("triton")
from kplora_kernels.ops import sketch_triton  # noqa: E402
from kplora_kernels.subspace import GradientSketch, InputSketch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("KPLORA_BACKEND", "triton")  # lets the interpreter serve CPU tensors


def _oracle(A, B, M1, M2):
    A, B, M1 = A.double(), B.double(), M1.double()
    c1 = A.T @ (B @ M1)
    return c1, None if M2 is None else B.T @ (A @ M2.double())


def _same_dtype_torch(A, B, M1, M2):
    """What a user would write in the input dtype: two GEMMs per side, results in that dtype."""
    c1 = (A.T @ (B @ M1.to(A.dtype))).double()
    return c1, None if M2 is None else (B.T @ (A @ M2.to(A.dtype))).double()


def _close(ours, oracle, own, dtype):
    floor = 8 * torch.finfo(torch.float32).eps * oracle.abs().max()
    err, own_err = (ours.double() - oracle).abs().max(), (own - oracle).abs().max()
    assert err <= 4 * own_err + floor, (dtype, float(err), float(own_err))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("two_sided", [True, False], ids=["gradient", "input"])
def test_kernel_matches_the_oracle(dtype, two_sided):
    gen = torch.Generator().manual_seed(0)
    T, a, b, K, L = 45, 80, 72, 12, 25  # widths over two blocks; tokens not a multiple of the tile
    A = torch.randn(T, a, generator=gen).to(DEVICE, dtype)
    B = torch.randn(T, b, generator=gen).to(DEVICE, dtype) if two_sided else A
    M1 = torch.randn(B.shape[1], K, generator=gen).to(DEVICE)
    M2 = torch.randn(a, L, generator=gen).to(DEVICE) if two_sided else None
    c1, c2, probe = sketch_triton.sketch_update(A, B, M1, M2)
    o1, o2 = _oracle(A, B, M1, M2)
    s1, s2 = _same_dtype_torch(A, B, M1, M2)
    _close(c1, o1, s1, dtype)
    if two_sided:
        _close(c2, o2, s2, dtype)
    else:
        assert c2 is None
    expected = float((B.double() @ M1.double()).pow(2).sum() + (0 if M2 is None else (A.double() @ M2.double()).pow(2).sum()))
    assert float(probe) == pytest.approx(expected, rel=2e-2 if dtype != torch.float32 else 1e-4)


def test_kernel_reads_strided_inputs_and_flags_non_finite_batches():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(50, 2 * 70, generator=gen).to(DEVICE)
    X = base[:, ::2]  # a non-contiguous view
    M1 = torch.randn(70, 16, generator=gen).to(DEVICE)
    c1, _, probe = sketch_triton.sketch_update(X, X, M1)
    torch.testing.assert_close(c1.double(), X.double().T @ (X.double() @ M1.double()), rtol=1e-4, atol=1e-3)
    bad = X.clone()
    bad[7, 3] = float("nan")
    assert not torch.isfinite(sketch_triton.sketch_update(bad, bad, M1)[2])
    with pytest.raises(ValueError, match="unsupported inputs"):
        sketch_triton.sketch_update(X.double(), X.double(), M1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sketches_through_the_kernel_equal_the_torch_path(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    out_f, in_f = 40, 72
    V = random_basis(in_f, 10, torch.float32, seed=3).to(DEVICE)
    pairs = [(torch.randn(30, out_f, generator=gen).to(DEVICE, dtype), torch.randn(30, in_f, generator=gen).to(DEVICE, dtype))
             for _ in range(3)]
    fused = GradientSketch(out_f, in_f, 3, V=V, strategy="randomized", device=DEVICE)
    inputs = InputSketch(in_f, V, strategy="randomized", width=16, device=DEVICE)
    for dY, X in pairs:
        fused.update(dY, X)
        inputs.update(X)
    monkeypatch.setenv("KPLORA_BACKEND", "torch")
    plain = GradientSketch(out_f, in_f, 3, V=V, strategy="randomized", device=DEVICE)
    plain_inputs = InputSketch(in_f, V, strategy="randomized", width=16, device=DEVICE)
    for dY, X in pairs:
        plain.update(dY, X)
        plain_inputs.update(X)
    # the fused path against the float64 oracle, as close as torch in the input dtype (and the torch
    # path, which upcasts to fp32, the same way)
    Y64 = sum(dY.double().T @ (X.double() @ fused.omega.double()) for dY, X in pairs)
    W64 = sum((dY.double() @ fused.psi.double().T).T @ X.double() for dY, X in pairs)
    S64 = sum(X.double().T @ (X.double() @ inputs.omega.double()) for _, X in pairs)
    Yd = sum(dY.T @ (X @ fused.omega.to(dtype)) for dY, X in pairs).double()
    Wd = sum((dY @ fused.psi.T.to(dtype)).T @ X for dY, X in pairs).double()
    Sd = sum(X.T @ (X @ inputs.omega.to(dtype)) for _, X in pairs).double()
    for ours, oracle, own in ((fused.Y, Y64, Yd), (fused.W, W64, Wd), (inputs.state, S64, Sd),
                              (plain.Y, Y64, Yd), (plain.W, W64, Wd), (plain_inputs.state, S64, Sd)):
        _close(ours, oracle, own, dtype)
    torch.testing.assert_close(inputs.energy, plain_inputs.energy)
    bad = pairs[0][1].clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="X contains NaN or Inf"):
        monkeypatch.setenv("KPLORA_BACKEND", "triton")
        fused.update(pairs[0][0], bad)
    _close(fused.Y, Y64, Yd, dtype)  # the refused batch left no trace


def test_gpu_sketch_script_smoke_run(tmp_path, monkeypatch):
    """bench/gpu_sketch.py (issue 12's GPU figures: the kernel against the bf16 two-GEMM form, its
    one-read fraction, the boundaries on a bf16 stack) runs end to end at tiny shapes; on the CPU
    the kernel runs in the interpreter (the fixture's KPLORA_BACKEND=triton)."""
    import importlib.util
    import json
    import pathlib

    pytest.importorskip("transformers")
    path = pathlib.Path(__file__).parent.parent / "bench" / "gpu_sketch.py"
    spec = importlib.util.spec_from_file_location("gpu_sketch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("OUT", str(tmp_path))
    results = module.main(["--device", DEVICE, "--tiny"])
    assert set(results["sketch_update"]) == {"96x160", "160x96"}
    for figures in results["sketch_update"].values():
        assert figures["torch_over_update"]["torch_two_gemm_bf16"] > 0 and figures["K"] == 40 and figures["L"] == 81
        assert figures["one_read_fraction"]["triton_kernel"] > 0
    assert results["boundaries"]["data_pass_over_forward"] > 0
    assert json.loads((tmp_path / "gpu_sketch.json").read_text())["boundaries"]["layers"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.mm's fp32 output of half inputs)")
def test_half_route_on_cuda_matches_the_cpu_upcast_sketches(monkeypatch):
    """The fp32-output half GEMMs on CUDA (``subspace.sketch._mm32``) against float64 oracles of the
    same bf16 inputs (with the sketch's own ``Ω̂`` and basis, which sit on the split grid): the
    covariance to fp32 summation, the randomized sketch and the exact residual energy to the bf16
    split's 16 bits (products with the ``hi`` part alone are off by 2.4e-3 and 2.8e-5, measured by
    emulation on the CPU). Width 160 > the kernel's 128 columns, so the randomized sketch takes the
    torch half route, not the Triton kernel."""
    from kplora_kernels.subspace import sketch as sketch_module

    if not sketch_module._MM_OUT_DTYPE:
        pytest.skip("this torch has no aten::mm.dtype (fp32 output of half inputs): the route is off")
    assert sketch_module._half_route(torch.zeros(1, 4, dtype=torch.bfloat16, device="cuda"))
    calls = []  # the fp32-output half GEMMs really run (an upcast would pass the comparisons below)
    mm = torch.mm

    def recording_mm(a, b, *args, **kwargs):
        if kwargs.get("out_dtype") is torch.float32 and a.dtype == torch.bfloat16 and a.is_cuda:
            calls.append(tuple(a.shape))
        return mm(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "mm", recording_mm)
    gen = torch.Generator().manual_seed(4)
    dim = 1100
    X = torch.randn(256, dim, generator=gen).to(torch.bfloat16)
    Xd = X.double()
    V = random_basis(dim, 40, torch.float32, seed=5)
    for strategy, width in (("covariance", None), ("randomized", 160)):
        gpu = InputSketch(dim, V.cuda(), strategy=strategy, width=width, device="cuda")
        for batch in X.split(64):
            gpu.update(batch.cuda())
        if strategy == "covariance":
            ours, ref, tol = gpu.covariance(), Xd.T @ Xd, 1e-5
        else:
            ours, ref, tol = gpu.state, Xd.T @ (Xd @ gpu.omega.cpu().double()), 5e-5
        assert (ours.cpu().double() - ref).abs().max() <= tol * ref.abs().max()
        E = float(Xd.pow(2).sum())
        assert abs(float(gpu.energy[0]) - E) <= 2e-5 * E  # summed in fp32 per batch
        if gpu.exact_residual:
            inside = float((Xd @ gpu._Vf.fp32().cpu().double()).pow(2).sum())
            assert abs(float(gpu.energy[1]) - inside) <= 2e-6 * inside
        assert calls, f"{strategy}: no fp32-output bf16 GEMM ran on CUDA"
        calls.clear()
