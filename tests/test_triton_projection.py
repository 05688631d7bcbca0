"""The Triton projection kernels (under TRITON_INTERPRET=1 on CPU, or on CUDA): every path in
fp32/fp16/bf16 against the float64 oracle, in place, launches per group, in-place safety under
multi-config autotuning (trials on scratch outputs, keys bucketed), one host list per launch, bases
cast once per version, int64 offsets, and the dispatcher's reasons.

Tolerance (docs/design.md §3): the kernel's error against float64 is at most 4× the same-dtype
torch reference's own error plus two roundings of the largest term.
"""
import mmap

import pytest
import torch

from helpers import raises, random_basis
from kplora_kernels import ops
import oracles as reference  # the float64 oracles; in a low dtype, the same-dtype torch run

triton = pytest.importorskip("triton")
from kplora_kernels.ops import triton_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not triton_kernels.INTERPRET,
                                reason="Triton needs CUDA or TRITON_INTERPRET=1")


def as64(t):
    return None if t is None else t.detach().cpu().double()


def check(result, G, U, V, scale, uc=False, vc=False):
    oracle = reference.residual_project_unchecked(as64(G), as64(U), as64(V), scale, uc, vc)
    own = reference.residual_project_unchecked(G, U, V, scale, uc, vc)
    err = (as64(result) - oracle).abs().max().item()
    ref_err = (as64(own) - oracle).abs().max().item()
    one_rounding = torch.finfo(G.dtype).eps * abs(scale) * G.abs().max().item()
    assert err <= 4 * ref_err + 2 * one_rounding, f"error {err:.3g} vs reference's own {ref_err:.3g}"


def case(out_dim, in_dim, k_out, k_in, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(out_dim, in_dim, generator=gen, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    U = None if k_out is None else random_basis(out_dim, k_out, seed=seed + 1).to(dtype=dtype, device=DEVICE)
    V = None if k_in is None else random_basis(in_dim, k_in, seed=seed + 2).to(dtype=dtype, device=DEVICE)
    return G, U, V


# (k_out, k_in): one-sided fused (V, rank above one 16-wide block), two-sided (two passes), U only
# (cols pass + epilogue), and the general path for a rank above FUSED_MAX_K
PATHS = {"V-fused": (None, 20), "UV-two-pass": (17, 20), "U-only": (20, None), "general": (3, 40)}


@pytest.mark.parametrize("path", PATHS, ids=PATHS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paths_in_every_dtype_in_place_and_twice(dtype, path, monkeypatch):
    if path == "general":
        monkeypatch.setattr(triton_kernels, "FUSED_MAX_K", 32)  # K = 43 > one 16-wide block
    G, U, V = case(37, 70, *PATHS[path], dtype)  # rows and columns span several blocks, with a tail
    check(ops.residual_project(G, U, V, 0.7, backend="triton"), G, U, V, 0.7)
    H = G.clone()
    ops.residual_project(H, U, V, 0.7, out=H, backend="triton")
    check(H, G, U, V, 0.7)
    once = G.clone()
    ops.residual_project(once, U, V, 1.0, out=once, backend="triton")
    twice = once.clone()
    ops.residual_project(twice, U, V, 1.0, out=twice, backend="triton")
    check(twice, G, U, V, 1.0)  # a projection applied twice is one projection
    # and the second call only removes rounding: far less than the first call removed
    assert (as64(twice) - as64(once)).abs().max() <= 0.05 * (as64(G) - as64(once)).abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restore_offsets_in_every_dtype(dtype):
    W0, U, V = case(37, 70, 17, 20, dtype)
    W = W0 + (0.05 * torch.randn_like(W0.float())).to(dtype)
    for U_, V_ in [(None, V), (U, V), (U, None)]:
        got = ops.subspace_restore_(W.clone(), U_, V_, anchor=ops.subspace_anchor(W0, U_, V_), backend="triton")
        oracle = as64(W0) + reference.residual_project_unchecked(as64(W) - as64(W0), as64(U_), as64(V_), 1.0)
        own = reference.subspace_restore(W, W0, U_, V_)
        err = (as64(got) - oracle).abs().max().item()
        ref_err = (as64(own) - oracle).abs().max().item()
        assert err <= 4 * ref_err + 2 * torch.finfo(dtype).eps * W0.abs().max().item()


class LaunchCounter:
    def __init__(self, kernels):
        self.kernels, self.launches = kernels, []

    def __getitem__(self, name):
        kernel = self.kernels[name]
        counter = self

        class Wrapped:
            def __getitem__(self, grid):
                counter.launches.append(name)
                return kernel[grid]

            def __getattr__(self, attr):  # the launcher reads the autotuner's configs and keys
                return getattr(kernel, attr)

        return Wrapped()


def test_batch_dims_and_groups_are_single_launches(monkeypatch):
    counter = LaunchCounter(triton_kernels.KERNELS)
    monkeypatch.setattr(triton_kernels, "KERNELS", counter)
    _, U, V = case(20, 24, 3, 5, torch.float32)
    Gb = torch.randn(2, 3, 20, 24, device=DEVICE)
    check(ops.residual_project(Gb, None, V, 0.5, backend="triton").view(-1, 24), Gb.view(-1, 24), None, V, 0.5)
    assert counter.launches == ["rows"], "six matrices of one shape: one launch"
    counter.launches.clear()
    Gs = [torch.randn(20, 24, device=DEVICE) for _ in range(4)] + [torch.randn(24, 20, device=DEVICE) for _ in range(2)]
    Vs = [V] * 4 + [random_basis(20, 5, torch.float32).to(DEVICE)] * 2
    before = [G.clone() for G in Gs]
    ops.residual_project_grouped_(Gs, None, Vs, [0.1 * (i + 1) for i in range(6)], backend="triton")
    assert sorted(counter.launches) == ["rows", "rows"], "two shapes: two launches"
    for i, (G, G0, Vi) in enumerate(zip(Gs, before, Vs)):
        check(G, G0, None, Vi, 0.1 * (i + 1))


def stub_bench(calls):
    def do_bench(kernel_call, quantiles):
        kernel_call()  # each trial runs the kernel on the real buffers, as triton's do_bench does
        kernel_call()
        calls.append(1)
        return [1.0 + 0.01 * len(calls)] * 3
    return do_bench


def multi_configs():
    cfg = lambda bm, bn: triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 16})  # noqa: E731
    return {kind: [cfg(16, 32), cfg(32, 16), cfg(16, 16)] for kind in ("rows", "cols", "epilogue")}


@pytest.mark.skipif(DEVICE == "cuda", reason="emulates the autotuner under the interpreter")
@pytest.mark.parametrize("sides", [(None, 5), (3, 5), (4, None)], ids=["V", "UV", "U"])
def test_in_place_is_safe_under_multi_config_autotuning(monkeypatch, sides):
    calls = []
    monkeypatch.setattr(triton_kernels, "KERNELS", triton_kernels.build_kernels(multi_configs(), stub_bench(calls)))
    G, U, V = case(40, 48, *sides, torch.float32)
    H = G.clone()
    ops.residual_project(H, U, V, 0.5, out=H, backend="triton")  # first call for this key: tunes
    assert len(calls) >= 3, "the stub benchmarker must have run every config"
    check(H, G, U, V, 0.5)  # projected and scaled once, not once per trial


@pytest.mark.skipif(DEVICE == "cuda", reason="emulates the autotuner under the interpreter")
def test_new_row_counts_do_not_retune(monkeypatch):
    calls = []
    monkeypatch.setattr(triton_kernels, "KERNELS", triton_kernels.build_kernels(multi_configs(), stub_bench(calls)))
    _, _, V = case(40, 48, None, 5, torch.float32)
    ops.residual_project(torch.randn(40, 48), None, V, 0.5, backend="triton")
    tuned = len(calls)
    assert tuned == 3
    for rows in (23, 64, 1):  # a new token count: same columns and rank, no new tuning
        G = torch.randn(rows, 48)
        check(ops.residual_project(G, None, V, 0.5, backend="triton"), G, None, V, 0.5)
    assert len(calls) == tuned
    ops.residual_project(torch.randn(40, 32), None, random_basis(32, 5, torch.float32), 0.5, backend="triton")
    assert len(calls) == 2 * tuned, "a new column count does tune"


@pytest.mark.skipif(DEVICE == "cuda", reason="emulates the autotuner under the interpreter")
def test_without_the_scratch_redirection_autotuning_corrupts_in_place(monkeypatch):
    """The control that makes the test above meaningful: tuning on the caller's buffer projects it
    once per trial."""
    monkeypatch.setattr(triton_kernels, "_needs_scratch", lambda *args: False)
    monkeypatch.setattr(triton_kernels, "KERNELS", triton_kernels.build_kernels(multi_configs(), stub_bench([])))
    G, U, V = case(40, 48, None, 5, torch.float32)
    H = G.clone()
    ops.residual_project(H, U, V, 0.5, out=H, backend="triton")
    expected = reference.residual_project(G, U, V, 0.5)
    assert (H - expected).abs().max() > 0.1 * expected.abs().max()


@pytest.mark.skipif(DEVICE == "cuda", reason="emulates the autotuner under the interpreter")
def test_epilogue_tunes_once_per_rank_bucket(monkeypatch):
    """The general path's K = k_out + k_in grows per task and differs per layer: keyed on K rounded up
    to a power of two, K = 35 and K = 40 share one tuning, K = 70 tunes again."""
    calls = []
    monkeypatch.setattr(triton_kernels, "KERNELS", triton_kernels.build_kernels(multi_configs(), stub_bench(calls)))
    monkeypatch.setattr(triton_kernels, "FUSED_MAX_K", 16)
    counts = []
    for k_in in (32, 37, 67):
        G, U, V = case(24, 80, 3, k_in, torch.float32, seed=k_in)
        H = G.clone()
        ops.residual_project(H, U, V, 0.5, out=H, backend="triton")
        check(H, G, U, V, 0.5)
        counts.append(len(calls))
    assert counts == [3, 3, 6]


def test_one_host_list_per_two_sided_launch(monkeypatch):
    """Every pointer array and the scales of a launch travel in one packed buffer: a two-sided
    projection of a group (column pass, then row kernel) turns one host list into a tensor."""
    Gs = [case(20, 24, 3, 5, torch.float32, seed=s)[0] for s in range(3)]
    _, U, V = case(20, 24, 3, 5, torch.float32)
    before = [G.clone() for G in Gs]
    made, real = [], torch.tensor

    def counting(data, *args, **kwargs):
        if isinstance(data, (list, tuple)):
            made.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counting)
    ops.residual_project_grouped_(Gs, [U] * 3, [V] * 3, [0.5, 0.6, 0.7], backend="triton")
    monkeypatch.undo()
    assert len(made) == 1, f"{len(made)} host lists became tensors"
    for G, G0, s in zip(Gs, before, (0.5, 0.6, 0.7)):
        check(G, G0, U, V, s)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_bases_are_cast_once_per_version(dtype):
    """fp32 bases with a bf16 gradient: the compute-dtype copy is made once and reused; an in-place
    write to the basis (a new version) makes a fresh copy, so the result follows the new values."""
    from kplora_kernels.ops import cast_cache

    G, _, _ = case(24, 40, None, None, dtype)
    V = random_basis(40, 6, torch.float32).to(DEVICE).contiguous()
    first = cast_cache.as_compute(V, dtype)
    check(ops.residual_project(G, None, V, 0.5, backend="triton"), G, None, V, 0.5)
    assert cast_cache.as_compute(V, dtype) is first, "the cast copy is reused while V is unchanged"
    with torch.no_grad():
        V.copy_(random_basis(40, 6, torch.float32, seed=9).to(DEVICE))
    assert cast_cache.as_compute(V, dtype) is not first
    check(ops.residual_project(G, None, V, 0.5, backend="triton"), G, None, V, 0.5)
    assert cast_cache.as_compute(V, torch.float32) is V


def large_stride_view(rows, cols, row_stride, dtype=torch.float16):
    """A ``rows×cols`` view whose rows lie ``row_stride`` elements apart, over an anonymous mapping
    that the kernel touches only where the rows are (no physical memory for the gaps)."""
    elem = torch.finfo(dtype).bits // 8
    nbytes = ((rows - 1) * row_stride + cols) * elem
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
    flat = torch.frombuffer(buffer, dtype=dtype)
    return flat.as_strided((rows, cols), (row_stride, 1)), buffer


@pytest.mark.skipif(DEVICE == "cuda", reason="a CPU view read by the interpreter")
@pytest.mark.parametrize("sides", [(None, 5), (3, 5), (3, None)], ids=["V", "UV", "U"])
def test_offsets_past_int32(sides):
    # row 2 starts 2·(2³⁰ + 16) = 2³¹ + 32 elements in: an int32 offset wraps there
    G, buffer = large_stride_view(3, 32, 2 ** 30 + 16)
    values = torch.randn(3, 32, dtype=torch.float64).to(torch.float16)
    G.copy_(values)
    _, U, V = case(3, 32, *sides, torch.float16)
    result = ops.residual_project(G, U, V, 0.5, backend="triton")
    check(result, values, U, V, 0.5)
    ops.residual_project(G, U, V, 0.5, out=G, backend="triton")  # in place through the same offsets
    check(G, values, U, V, 0.5)
    del G
    buffer.close()


def test_dispatch_reasons_and_no_silent_fallback():
    G = torch.randn(6, 5, dtype=torch.float64)
    reasons = ops.not_supported_reasons("triton", G)
    assert any("float64" in r for r in reasons)
    with raises(ValueError, "backend 'triton' cannot run", "float64"):
        ops.residual_project(G, backend="triton")
    with raises(ValueError, "backend 'triton' cannot run", "meta"):
        ops.residual_project(torch.empty(6, 5, device="meta"), backend="triton")
    with raises(ValueError, "backend 'cpp' cannot run", "complement"):
        ops.project_rows(torch.randn(4, 5), random_basis(5, 2, torch.float32), backend="cpp", V_complement=True)
    assert ops.not_supported_reasons("torch", G) == []
    with raises(ValueError, "backend must be one of"):
        ops.not_supported_reasons("cuda", G)
