"""Streaming, mergeable estimators of the subspaces KeepLoRA++ needs.

``InputSketch``: after a task, the dominant directions of the task's inputs that the protected
basis ``V`` does not yet hold (GPM rule, DESIGN §1), from inputs seen batch by batch.
``GradientSketch``: at a task start, the top-r right singular vectors of the projected mean task
gradient ``Ĝ = (1/n) Σ_b (dY_b (I−UUᵀ))ᵀ (X_b (I−VVᵀ))`` (``out×in``), from ``(dY_b, X_b)`` pairs.

Both add up across batches, shards and data-parallel ranks (``merge``, ``all_reduce``): their state
is a sum of per-batch terms. Randomized strategies draw their test matrices from a shared seed, so
every rank draws the same ones. Orientation: ``X`` is ``tokens×in``, ``dY`` is ``tokens×out``.
"""
from __future__ import annotations

import math

import torch

from .._checks import check_basis, check_eps, check_tensor
from ..distributed import is_distributed
from ..ops import project_rows

DEFAULT_MEMORY_BUDGET = 64 * 2**20  # bytes per sketch


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf; the batch was not accumulated (the sketch is unchanged)")


def _gaussian(rows: int, cols: int, seed: int, device) -> torch.Tensor:
    """The shared test matrix: the same on every rank for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(device=device, dtype=torch.float32)


def _residual_rows(X: torch.Tensor, V: torch.Tensor | None, complement: bool = False) -> torch.Tensor:
    """``X (I − V Vᵀ)`` in fp32 (``X (V Vᵀ)`` when ``V`` spans the residual space; ``X`` itself when
    there is no ``V``)."""
    X = X.float()
    if V is None or (V.shape[1] == 0 and not complement):
        return X
    return project_rows(X, V, V_complement=complement)


def complement_basis(V: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (``dim×(dim−k)``) of the orthogonal complement of ``V`` (``dim×k``)."""
    Q = torch.linalg.qr(V.double(), mode="complete")[0]
    return Q[:, V.shape[1]:].to(V.dtype).contiguous()


def _all_reduce(tensors, group) -> None:
    if not is_distributed():
        return
    for t in tensors:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)


class InputSketch:
    """Accumulates inputs ``X`` (``(..., dim)``) of one task to expand the basis ``V`` by the GPM rule.

    Strategies: ``"covariance"`` keeps ``Σ Xᵀ X`` exactly (``dim²`` floats), gives exactly the GPM
    result of the stacked inputs and serves any basis at :meth:`expand`, so one sketch of an input
    shared by several weights (q, k, v of a block) serves all of them. ``"randomized"`` keeps a
    Nyström sketch ``Σ X̂ᵀ (X̂ Ω)`` of the *residual* covariance (``X̂ = X (I − V Vᵀ)``, ``dim×width``
    floats, ``Ω`` from ``seed``) for large ``dim``; it is tied to the basis ``V`` (``dim×k``) given
    here, which :meth:`expand` must be given again. ``"auto"`` takes the exact one when it fits in
    ``memory_budget`` bytes. ``strategy`` and ``memory_bytes`` tell what was chosen.
    """

    def __init__(self, dim: int, V: torch.Tensor | None = None, *, V_complement: bool = False,
                 strategy: str = "auto", width: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 seed: int = 0, device=None):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int ≥ 1, got {dim!r}")
        if strategy not in ("auto", "covariance", "randomized"):
            raise ValueError(f"strategy must be 'auto', 'covariance' or 'randomized', got {strategy!r}")
        if V is not None:
            check_basis("V", V, dim, "dim")
            device = V.device if device is None else device
        self.dim, self.seed = dim, seed
        self.device = torch.device(device or "cpu")
        if strategy == "auto":
            strategy = "covariance" if 4 * dim * dim <= memory_budget else "randomized"
        self.strategy = strategy
        keep_V = strategy == "randomized" and V is not None and (V.shape[1] > 0 or V_complement)
        self.V = V.detach().to(self.device) if keep_V else None  # its own dtype: validated as such
        self.V_complement = V_complement and keep_V
        if strategy == "covariance":
            self.state = torch.zeros(dim, dim, device=self.device)
        else:
            width = width or max(1, min(dim, memory_budget // (4 * dim), 1024))
            if not 1 <= width <= dim:
                raise ValueError(f"width must be in [1, dim = {dim}], got {width}")
            self.omega = _gaussian(dim, width, seed, self.device)
            self.state = torch.zeros(dim, width, device=self.device)
        self.width = self.state.shape[1]
        # ‖X‖² and ‖X (I − VVᵀ)‖² (the latter for the randomized strategy), accumulated in fp64
        self.energy = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.tokens = 0

    @property
    def memory_bytes(self) -> int:
        extra = self.omega.numel() * 4 if self.strategy == "randomized" else 0
        return self.state.numel() * 4 + extra

    def update(self, X: torch.Tensor) -> None:
        """Add a batch of inputs ``(..., dim)`` of any float dtype (accumulated in fp32)."""
        check_tensor("X", X, min_ndim=1)
        if X.shape[-1] != self.dim:
            raise ValueError(f"X must have shape (..., {self.dim}), got {tuple(X.shape)}")
        X = X.detach().reshape(-1, self.dim).to(self.device)
        _check_finite("X", X)
        if self.strategy == "covariance":
            R = X.float()
            self.state.addmm_(R.mT, R)
        else:
            R = _residual_rows(X, self.V, self.V_complement)
            self.state.addmm_(R.mT, R @ self.omega)
        self.energy += torch.stack([X.double().pow(2).sum(), R.double().pow(2).sum()])
        self.tokens += X.shape[0]

    def _check_compatible(self, other: "InputSketch") -> None:
        if not isinstance(other, InputSketch):
            raise TypeError(f"can only merge another InputSketch, got {type(other).__name__}")
        mine = (self.dim, self.strategy, self.width, self.seed, self.V_complement)
        theirs = (other.dim, other.strategy, other.width, other.seed, other.V_complement)
        if mine != theirs:
            raise ValueError(f"cannot merge sketches of different configuration (dim, strategy, width, seed): "
                             f"{mine} vs {theirs}")
        same_basis = (self.V is None and other.V is None) or (
            self.V is not None and other.V is not None and self.V.shape == other.V.shape
            and torch.equal(self.V, other.V.to(self.device)))
        if not same_basis:
            raise ValueError("cannot merge sketches taken against different bases V")

    def merge(self, other: "InputSketch") -> "InputSketch":
        """Add ``other`` (same configuration and basis) into this sketch; returns self."""
        self._check_compatible(other)
        self.state += other.state.to(self.device)
        self.energy += other.energy.to(self.device)
        self.tokens += other.tokens
        return self

    def all_reduce(self, group=None) -> "InputSketch":
        """Sum the sketch over the ranks of ``group`` (a no-op without a process group)."""
        tokens = torch.tensor([float(self.tokens)], dtype=torch.float64, device=self.device)
        _all_reduce([self.state, self.energy, tokens], group)
        self.tokens = int(tokens.item())
        return self

    def residual_spectrum(self, V: torch.Tensor | None, complement: bool = False):
        """Eigenvalues (descending: ``s_j²`` of the residual inputs), eigenvectors (``dim×m``, in the
        residual space) and ``‖X (I − VVᵀ)‖²``; ``complement``: ``V`` spans the residual space."""
        if self.strategy == "covariance":
            C = self.state.double()
            if complement:  # the residual covariance lives in span(V): decompose Vᵀ C V
                Vd = V.double()
                M = Vd.mT @ C @ Vd
                evals, W = torch.linalg.eigh((M + M.mT) / 2)
                return evals.flip(0).clamp_min(0), Vd @ W.flip(1), M.trace().item()
            if V is not None:
                Vd = V.double()
                C = C - Vd @ (Vd.mT @ C)
                C = C - (C @ Vd) @ Vd.mT
            evals, evecs = torch.linalg.eigh((C + C.mT) / 2)
            return evals.flip(0).clamp_min(0), evecs.flip(1), C.trace().item()
        # stable single-pass Nyström approximation of the PSD residual covariance from Y = C Ω
        Y, omega = self.state.double(), self.omega.double()
        nu = math.sqrt(self.dim) * torch.finfo(torch.float32).eps * Y.norm().item()
        Y_nu = Y + nu * omega
        core = omega.mT @ Y_nu
        L = torch.linalg.cholesky((core + core.mT) / 2)
        B = torch.linalg.solve_triangular(L, Y_nu.mT, upper=False).mT  # Y_ν L⁻ᵀ
        Uy, S, _ = torch.linalg.svd(B, full_matrices=False)
        evals = (S.pow(2) - nu).clamp_min(0)
        vecs = Uy
        if self.V is not None:  # keep the estimate in the residual space
            inside = self.V.double() @ (self.V.double().mT @ vecs)
            vecs = inside if self.V_complement else vecs - inside
        return evals, vecs, self.energy[1].item()

    def expand(self, V: torch.Tensor | None, eps: float, *, V_complement: bool = False,
               keep_free: int = 0) -> torch.Tensor:
        """``V`` extended by the GPM rule: append residual directions while
        ``(E − ‖R‖² + Σ_appended s_j²) / E < eps``, leaving at least ``keep_free`` residual dimensions.
        With ``V_complement=True`` both the given and the returned basis span the residual space
        (the complement shrinks instead of ``V`` growing). Returns ``dim×k'`` in fp32 (or V's dtype)."""
        eps = check_eps("eps", eps)
        if V is not None:
            check_basis("V", V, self.dim, "dim")
            V = V.detach().to(self.device)
            if V.shape[1] == 0 and not V_complement:
                V = None
        if V is None and V_complement:
            raise ValueError("V_complement=True needs the complement basis V")
        if self.strategy == "randomized" and ((V is None) != (self.V is None) or V_complement != self.V_complement
                                              or (V is not None and (V.shape != self.V.shape or not torch.allclose(V, self.V)))):
            raise ValueError("the randomized sketch projects against the basis V it was built with: "
                             "expand must be given that basis")
        base = torch.zeros(self.dim, 0, device=self.device) if V is None else V
        residual_dims = base.shape[1] if V_complement else self.dim - base.shape[1]
        total = self.energy[0].item()
        if total == 0 or residual_dims <= keep_free:
            return base.clone()
        evals, evecs, residual = self.residual_spectrum(V, V_complement)
        captured = total - residual  # the energy V already holds
        before = captured + torch.cat([evals.new_zeros(1), torch.cumsum(evals, 0)[:-1]])
        count = int((before / total < eps).sum().item())
        count = min(count, int((evals > evals[0] * 1e-10).sum().item()) if evals.numel() else 0,
                    residual_dims - keep_free)
        if count == 0:
            return base.clone()
        new = evecs[:, :count]
        if V_complement:  # the new complement: the part of span(V) orthogonal to the new directions
            w = torch.linalg.qr(base.double().mT @ new)[0]
            rest = torch.linalg.qr(w, mode="complete")[0][:, count:]
            return (base.double() @ rest).to(base.dtype if base.is_floating_point() else torch.float32)
        new = new - base.double() @ (base.double().mT @ new)
        new, _ = torch.linalg.qr(new)
        return torch.cat([base, new.to(base.dtype if base.shape[1] else torch.float32)], dim=1)


class GradientSketch:
    """Accumulates the projected mean task gradient ``Ĝ`` (``out×in``) from ``(dY, X)`` batches and
    returns the adapter's ``A`` (top-r right singular vectors of ``Ĝ``, ``r×in``).

    ``"dense"`` keeps ``Ĝ`` itself (``out·in`` floats); ``"randomized"`` keeps the single-pass
    two-sided sketch ``Y = Ĝ Ω`` (``out×(r+p)``) and ``W = Ψ Ĝ`` (``(2(r+p)+1)×in``) with shared-seed
    ``Ω``, ``Ψ`` (Tropp et al., 2017), never forming ``Ĝ``. ``"auto"`` takes the dense one when it fits
    in ``memory_budget`` bytes. ``U`` (``out×k_out``) and ``V`` (``in×k_in``) are the protected bases.
    """

    def __init__(self, out_features: int, in_features: int, rank: int, U: torch.Tensor | None = None,
                 V: torch.Tensor | None = None, *, V_complement: bool = False, strategy: str = "auto", oversample: int = 8,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, seed: int = 0, device=None):
        for name, value in (("out_features", out_features), ("in_features", in_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(out_features, in_features):
            raise ValueError(f"rank must be an int in [1, {min(out_features, in_features)}], got {rank!r}")
        if strategy not in ("auto", "dense", "randomized"):
            raise ValueError(f"strategy must be 'auto', 'dense' or 'randomized', got {strategy!r}")
        for name, B, dim in (("U", U, out_features), ("V", V, in_features)):
            if B is not None:
                check_basis(name, B, dim, f"{'out' if name == 'U' else 'in'}_features")
                device = B.device if device is None else device
        room = (V.shape[1] if V_complement else in_features - V.shape[1]) if V is not None else in_features
        if room < rank:
            raise ValueError(f"V leaves {room} residual dimensions, fewer than rank = {rank}")
        self.shape, self.rank, self.seed = (out_features, in_features), rank, seed
        self.device = torch.device(device or "cpu")
        prep = lambda B: None if B is None or B.shape[1] == 0 else B.detach().to(self.device)  # noqa: E731
        self.U = prep(U)
        self.V = V.detach().to(self.device) if V is not None and (V.shape[1] or V_complement) else None
        self.V_complement = V_complement and self.V is not None
        if strategy == "auto":
            strategy = "dense" if 4 * out_features * in_features <= memory_budget else "randomized"
        self.strategy = strategy
        if strategy == "dense":
            self.G = torch.zeros(out_features, in_features, device=self.device)
        else:
            k = min(rank + oversample, out_features, in_features)
            l = min(2 * k + 1, out_features)
            self.omega = _gaussian(in_features, k, seed, self.device)
            self.psi = _gaussian(l, out_features, seed + 1, self.device)
            self.Y = torch.zeros(out_features, k, device=self.device)
            self.W = torch.zeros(l, in_features, device=self.device)
        self.batches = 0

    def _state(self) -> list[torch.Tensor]:
        return [self.G] if self.strategy == "dense" else [self.Y, self.W]

    @property
    def memory_bytes(self) -> int:
        extra = [] if self.strategy == "dense" else [self.omega, self.psi]
        return sum(t.numel() * 4 for t in self._state() + extra)

    def update(self, dY: torch.Tensor, X: torch.Tensor) -> None:
        """Add one batch: output gradients ``dY`` (``(..., out)``) and inputs ``X`` (``(..., in)``)."""
        check_tensor("dY", dY, min_ndim=1)
        check_tensor("X", X, min_ndim=1)
        out_f, in_f = self.shape
        if dY.shape[-1] != out_f or X.shape[-1] != in_f or dY.shape[:-1] != X.shape[:-1]:
            raise ValueError(f"dY must be (..., {out_f}) and X (..., {in_f}) with the same leading dims, "
                             f"got {tuple(dY.shape)} and {tuple(X.shape)}")
        dY = dY.detach().reshape(-1, out_f).to(self.device)
        X = X.detach().reshape(-1, in_f).to(self.device)
        _check_finite("dY", dY)
        _check_finite("X", X)
        dYh, Xh = _residual_rows(dY, self.U), _residual_rows(X, self.V, self.V_complement)
        if self.strategy == "dense":
            self.G.addmm_(dYh.mT, Xh)
        else:
            self.Y.addmm_(dYh.mT, Xh @ self.omega)
            self.W.addmm_((dYh @ self.psi.mT).mT, Xh)
        self.batches += 1

    def merge(self, other: "GradientSketch") -> "GradientSketch":
        """Add ``other`` (same configuration, seed and bases) into this sketch; returns self."""
        if not isinstance(other, GradientSketch):
            raise TypeError(f"can only merge another GradientSketch, got {type(other).__name__}")
        mine = (self.shape, self.rank, self.strategy, self.seed, self.V_complement, [t.shape for t in self._state()])
        theirs = (other.shape, other.rank, other.strategy, other.seed, other.V_complement,
                  [t.shape for t in other._state()])
        if mine != theirs:
            raise ValueError(f"cannot merge sketches of different configuration: {mine} vs {theirs}")
        for a, b in ((self.U, other.U), (self.V, other.V)):
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b.to(self.device))):
                raise ValueError("cannot merge sketches taken against different bases")
        for mine_t, theirs_t in zip(self._state(), other._state()):
            mine_t += theirs_t.to(self.device)
        self.batches += other.batches
        return self

    def all_reduce(self, group=None) -> "GradientSketch":
        """Sum over the ranks of ``group`` (a no-op without a process group)."""
        batches = torch.tensor([float(self.batches)], dtype=torch.float64, device=self.device)
        _all_reduce(self._state() + [batches], group)
        self.batches = int(batches.item())
        return self

    def mean_gradient(self) -> torch.Tensor:
        """``Ĝ`` averaged over batches (``out×in``); dense strategy only."""
        if self.strategy != "dense":
            raise NotImplementedError("the randomized strategy never forms Ĝ; use adapter_init() or strategy='dense'")
        return self.G / max(self.batches, 1)

    def adapter_init(self) -> torch.Tensor:
        """``A`` (``r×in``): orthonormal rows spanning the top-r right singular vectors of ``Ĝ``,
        orthogonal to ``V``; where ``Ĝ`` has fewer than r directions the rest are seeded random ones
        in the residual space. Raises when no batch was seen."""
        if self.batches == 0:
            raise RuntimeError("adapter_init() before any update(): the gradient is unknown")
        if self.strategy == "dense":
            _, S, right = torch.linalg.svd(self.G, full_matrices=False)  # fp32: directions only
        else:
            Q, _ = torch.linalg.qr(self.Y.double())
            core = torch.linalg.lstsq(self.psi.double() @ Q, self.W.double()).solution  # Ĝ ≈ Q core
            _, S, right = torch.linalg.svd(core, full_matrices=False)
        # directions the gradient spans; beyond its numerical rank the singular vectors are arbitrary
        kept = int((S > S[0] * 1e-6).sum()) if S.numel() and S[0] > 0 else 0
        A = right[: min(kept, self.rank)].mT.double()
        if A.shape[1] < self.rank:  # fill with seeded random directions (projected off V below)
            A = torch.cat([A, _gaussian(self.shape[1], self.rank - A.shape[1], self.seed + 2, self.device).double()], 1)
        if self.V is not None:
            inside = self.V.double() @ (self.V.double().mT @ A)
            A = inside if self.V_complement else A - inside
        return torch.linalg.qr(A)[0].mT.float().contiguous()
