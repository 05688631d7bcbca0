"""Subspace estimation: time per million tokens and memory of the streaming sketches against
(A) storing all activations and one dense SVD (the authors' approach) and (B) exact covariance +
``eigh``; and the task-start gradient: the sketch against materialising the mean ``out×in`` gradient.

Memory of each approach's state is recorded in ``extra_info`` (``state_MiB``). Full sizes with
``KPLORA_BENCH_FULL=1``; quick sizes otherwise. At dim 11008 the baselines need a 11008² ``eigh``
or an SVD of ``tokens×11008`` (minutes on 2 cores): only the sketch runs there.
"""
import pytest
import torch

from bench_sizes import FULL
from kplora_kernels import gpm_expand
from kplora_kernels.subspace import GradientSketch, InputSketch

TOKENS, BATCH = (16384, 2048) if FULL else (512, 128)
DIMS = [768, 4096, 11008] if FULL else [64, 96]
BASELINE_MAX_DIM = 4096
EPS = 0.99


def batches(dim, seed=0):
    """A stream of inputs with a decaying spectrum (a task's activations)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(dim, 64)
    mix = torch.randn(k, dim, generator=gen) * torch.logspace(0, -2, k).unsqueeze(1)
    return [torch.randn(BATCH, k, generator=gen) @ mix + 1e-3 * torch.randn(BATCH, dim, generator=gen)
            for _ in range(TOKENS // BATCH)]


@pytest.mark.parametrize("method", ["A_store_svd", "B_covariance_eigh", "ours"])
@pytest.mark.parametrize("dim", DIMS)
def test_input_subspace(benchmark, dim, method):
    if method != "ours" and dim > BASELINE_MAX_DIM:
        pytest.skip(f"the {method} baseline at dim {dim} takes minutes on 2 cores")
    stream = batches(dim)
    benchmark.group = f"input subspace dim={dim} tokens={TOKENS} (per-million-token time = min x {1e6 / TOKENS:.0f})"
    benchmark.extra_info["method"] = method

    if method == "A_store_svd":
        def run():
            return gpm_expand(None, torch.cat(stream), EPS)
        state = TOKENS * dim * 4
    elif method == "B_covariance_eigh":
        def run():
            C = torch.zeros(dim, dim)
            for X in stream:
                C.addmm_(X.mT, X)
            evals, evecs = torch.linalg.eigh(C.double())
            keep = int((torch.cumsum(evals.flip(0), 0) / evals.sum() < EPS).sum()) + 1
            return evecs.flip(1)[:, :keep]
        state = dim * dim * 4
    else:
        def run():
            sketch = InputSketch(dim)
            for X in stream:
                sketch.update(X)
            return sketch.expand(None, EPS)
        sketch = InputSketch(dim)
        state = sketch.memory_bytes
        benchmark.extra_info["strategy"] = sketch.strategy
    benchmark.extra_info["state_MiB"] = state / 2**20
    V = benchmark.pedantic(run, rounds=3 if FULL else 5, iterations=1)
    assert V.shape[0] == dim and 1 <= V.shape[1] <= dim


GRAD_SHAPE = (4096, 11008) if FULL else (96, 160)
GRAD_RANK = 32 if FULL else 8


@pytest.mark.parametrize("method", ["dense_gradient", "ours_sketch"])
def test_task_start_gradient(benchmark, method):
    out_f, in_f = GRAD_SHAPE
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(BATCH // 4, out_f, generator=gen), torch.randn(BATCH // 4, in_f, generator=gen))
             for _ in range(4)]
    benchmark.group = f"task-start gradient {out_f}x{in_f} r={GRAD_RANK}, {len(pairs)} batches of {BATCH // 4} tokens"
    benchmark.extra_info["method"] = method
    strategy = "dense" if method == "dense_gradient" else "randomized"
    benchmark.extra_info["state_MiB"] = GradientSketch(out_f, in_f, GRAD_RANK, strategy=strategy).memory_bytes / 2**20

    def run():
        sketch = GradientSketch(out_f, in_f, GRAD_RANK, strategy=strategy)
        for dY, X in pairs:
            sketch.update(dY, X)
        return sketch.adapter_init()

    A = benchmark.pedantic(run, rounds=3 if FULL else 5, iterations=1)
    assert A.shape == (GRAD_RANK, in_f)
