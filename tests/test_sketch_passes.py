"""``InputSketch.expansion``: what an expansion appended and captured, and whether the randomized
sketch ran out of width (issue 27 item 1). Inputs that need more new directions than the width are
covered by further passes, each sketch built against the basis the previous pass returned."""
import pytest
import torch

from helpers import random_basis
from kplora_kernels import gpm_expand
from kplora_kernels.subspace import InputSketch


def flat_inputs(n, dim, k, seed=0):
    """``n×dim`` inputs spanning ``k`` directions of about equal energy (no dominant direction)."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen, dtype=torch.float64))
    return (torch.randn(n, k, generator=gen, dtype=torch.float64) @ basis.T).float()


def planted(n, dim, k, noise=0.05, seed=0):
    """A ``k``-dimensional signal with decaying scales plus isotropic noise."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen, dtype=torch.float64))
    signal = torch.randn(n, k, generator=gen, dtype=torch.float64) * torch.linspace(6, 2, k, dtype=torch.float64)
    return (signal @ basis.T + noise * torch.randn(n, dim, generator=gen, dtype=torch.float64)).float()


def captured(X, V):
    """The fraction of ``‖X‖²`` in ``span(V)``, in float64."""
    X = X.double()
    return float((X @ V.double()).pow(2).sum() / X.pow(2).sum())


def sketched(sketch, X, batch=500):
    for part in X.split(batch):
        sketch.update(part)
    return sketch


@pytest.mark.parametrize("residual", ["auto", "exact"])
def test_width_limited_sketch_saturates_and_further_passes_meet_the_exact_rule(residual):
    """The issue's case: 100 flat directions in 300 inputs, width 32, eps 0.99. One pass appends 32
    (a third of the energy) and says so; passes against the growing basis reach the exact rule's
    energy with about its 99 directions."""
    X = flat_inputs(2000, 300, 100)
    eps = 0.99
    exact = gpm_expand(None, X.double(), eps)  # the rule on the stacked inputs, float64
    assert exact.shape[1] == 99 and captured(X, exact) >= eps

    first = sketched(InputSketch(300, strategy="randomized", width=32, residual=residual), X)
    assert first.expansion is None
    V = first.expand(None, eps)
    e = first.expansion
    assert (e.appended, e.saturated, e.width) == (32, True, 32) and V.shape == (300, 32)
    assert 0.28 <= e.energy <= 0.38 and e.energy <= captured(X, V) + 1e-4  # Nyström: a lower bound
    assert abs(e.energy - captured(X, V)) <= 0.02

    passes = 1
    while e.saturated and passes < 8:
        sketch = sketched(InputSketch(300, V, strategy="randomized", width=32, seed=passes, residual=residual), X)
        before = V.shape[1]
        V = sketch.expand(V, eps)
        e, passes = sketch.expansion, passes + 1
        assert e.appended == V.shape[1] - before >= 1
        truth = captured(X, V)
        if sketch.exact_residual:  # the in-basis part exact, the appended part a lower bound
            assert e.energy <= truth + 1e-4
        assert abs(e.energy - truth) <= 0.02
    assert not e.saturated and passes <= 5
    assert captured(X, V) >= eps
    assert abs(V.shape[1] - exact.shape[1]) <= 2
    torch.testing.assert_close(V.T @ V, torch.eye(V.shape[1]), atol=1e-5, rtol=0)


def test_covariance_expansion_reports_the_exact_energy_never_saturated():
    X = flat_inputs(2000, 300, 100)
    sketch = sketched(InputSketch(300, strategy="covariance"), X)
    V = sketch.expand(None, 0.99)
    e = sketch.expansion
    assert (e.appended, e.saturated, e.width) == (V.shape[1], False, None) and V.shape[1] == 99
    assert abs(e.energy - captured(X, V)) <= 1e-5
    V0 = random_basis(300, 7, torch.float32, seed=4)  # against a basis: the in-basis part counts too
    V = sketch.expand(V0, 0.5)
    assert sketch.expansion.appended == V.shape[1] - 7
    assert abs(sketch.expansion.energy - captured(X, V)) <= 1e-5 and sketch.expansion.energy >= 0.5


def test_unsaturated_randomized_expansion_reports_the_energy_it_reached():
    """Width to spare: the rule stops on its own; the report holds the energy in the new basis."""
    X = planted(2000, 96, 8)
    V0 = random_basis(96, 4, torch.float32)
    sketch = sketched(InputSketch(96, V0, strategy="randomized", width=40), X)
    assert sketch.exact_residual
    V = sketch.expand(V0, 0.9)
    e = sketch.expansion
    assert (e.saturated, e.width) == (False, 40) and 1 <= e.appended == V.shape[1] - 4 < 40
    truth = captured(X, V)
    assert e.energy >= 0.9 and truth - 0.01 <= e.energy <= truth + 1e-4


def test_room_exhausted_is_not_saturation():
    """``keep_free`` leaves no room for more: the sketch stops below eps but is not saturated (a
    further pass could append nothing)."""
    X = flat_inputs(1500, 40, 40)
    sketch = sketched(InputSketch(40, strategy="randomized", width=32), X)
    V = sketch.expand(None, 0.99, keep_free=30)
    e = sketch.expansion
    assert V.shape[1] == e.appended == 10 and e.energy < 0.99 and not e.saturated


def test_expansion_of_zero_inputs_and_of_a_full_basis():
    sketch = sketched(InputSketch(16, strategy="randomized", width=8), torch.zeros(20, 16))
    V = sketch.expand(None, 0.9)
    assert V.shape == (16, 0) and sketch.expansion == (0, 1.0, False, 8)
    X = planted(200, 16, 4)
    cov = sketched(InputSketch(16, strategy="covariance"), X)
    full = random_basis(16, 16, torch.float32)
    assert cov.expand(full, 0.9).shape == (16, 16)
    assert cov.expansion.appended == 0 and abs(cov.expansion.energy - 1.0) <= 1e-5


def test_one_sizing_rule_sizes_the_sketch_and_the_planner():
    """The sketch's auto strategy and width and the planner's byte count follow one rule."""
    from kplora_kernels.subspace.sizing import input_sketch_bytes, input_sketch_width, input_strategy

    assert input_sketch_width(11008, 64 * 2**20) == 1024  # LLaMA-7B's down_proj
    assert input_sketch_width(300, 4 * 300 * 32) == 32 and input_sketch_width(300, 1) == 1
    for dim, budget in [(64, 64 * 64 * 4), (64, 64 * 64 * 4 - 1), (300, 4 * 300 * 32), (3000, 4 * 3000 * 50)]:
        sketch = InputSketch(dim, memory_budget=budget)
        assert sketch.strategy == input_strategy(dim, budget)
        assert sketch.memory_bytes == input_sketch_bytes(dim, 0, budget)
        if sketch.strategy == "randomized":
            assert sketch.width == input_sketch_width(dim, budget)
