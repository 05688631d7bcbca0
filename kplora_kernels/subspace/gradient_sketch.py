"""``GradientSketch``: at a task start, the top-r right singular vectors of the projected mean task
gradient ``Ĝ = (1/n) Σ_b (dY_b (I−UUᵀ))ᵀ (X_b (I−VVᵀ))`` (``out×in``), from ``(dY_b, X_b)`` pairs.
Contracts shared with the input sketch (no batch projected, held bases, non-finite batches,
merging): :mod:`kplora_kernels.subspace.sketch`. Orientation: ``dY`` is ``tokens×out``, ``X``
``tokens×in``."""
from __future__ import annotations

import torch

from .._checks import check_basis, check_tensor
from ..distributed import all_reduce_sum_
from .common import (_fused_update, _gaussian, _given_basis, _Guard, _project_cols, _sqnorm, _to,
                     basis_signature, same_basis)
from .linalg import randomized_svd
from .sizing import DEFAULT_MEMORY_BUDGET, gradient_sketch_sizes, gradient_strategy


class GradientSketch(_Guard):
    """Accumulates the projected mean task gradient ``Ĝ`` (``out×in``) from ``(dY, X)`` batches and
    returns the adapter's ``A`` (top-r right singular vectors of ``Ĝ``, ``r×in``).

    ``"dense"`` keeps ``Σ dYᵀX`` (``out·in`` floats), projected once at finalisation;
    ``"randomized"`` keeps the single-pass two-sided sketch (Tropp et al., 2017) ``Y = ĜΩ``
    (``out×k``, ``k = r+p``) and ``W = ΨĜ`` (``l×in``, ``l = 2k+1``) through the projected test
    matrices ``Ω̂``, ``Ψ̂`` (module docstring), never forming ``Ĝ``. ``"auto"``: see
    :func:`gradient_strategy` (thin sketches except for small layers). ``U`` (``out×k_out``) and
    ``V`` (``in×k_in``) are the protected bases (``V_complement``: ``V`` spans the residual space).
    """

    def __init__(self, out_features: int, in_features: int, rank: int, U: torch.Tensor | None = None,
                 V: torch.Tensor | None = None, *, V_complement: bool = False, strategy: str = "auto", oversample: int = 8,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, seed: int = 0, device=None):
        for name, value in (("out_features", out_features), ("in_features", in_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(out_features, in_features):
            raise ValueError(f"rank must be an int in [1, {min(out_features, in_features)}], got {rank!r}")
        if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
            raise ValueError(f"oversample must be an int ≥ 0, got {oversample!r}")
        if strategy not in ("auto", "dense", "randomized"):
            raise ValueError(f"strategy must be 'auto', 'dense' or 'randomized', got {strategy!r}")
        for name, B, dim in (("U", U, out_features), ("V", V, in_features)):
            if B is not None:
                check_basis(name, B, dim, f"{'out' if name == 'U' else 'in'}_features")  # once, here
                device = B.device if device is None else device
        room = (V.shape[1] if V_complement else in_features - V.shape[1]) if V is not None else in_features
        if room < rank:
            raise ValueError(f"V leaves {room} residual dimensions, fewer than rank = {rank}")
        self.shape, self.rank, self.seed, self.oversample = (out_features, in_features), rank, seed, oversample
        self.device = torch.device(device or "cpu")
        # the bases are held where the caller keeps them and copied to the device only when used
        self.U = None if U is None or U.shape[1] == 0 else U.detach()
        self.V = V.detach() if V is not None and (V.shape[1] or V_complement) else None
        self.V_complement = V_complement and self.V is not None
        self._signatures = (basis_signature(self.U), basis_signature(self.V))
        if strategy == "auto":
            strategy = gradient_strategy(out_features, in_features, rank, oversample, memory_budget)
        self.strategy = strategy
        if strategy == "dense":
            self.G = torch.zeros(out_features, in_features, device=self.device)
        else:
            k, l = gradient_sketch_sizes(out_features, in_features, rank, oversample)
            Ud = None if self.U is None else _to(self.U, self.device)
            Vd = None if self.V is None else _to(self.V, self.device)
            f32 = torch.float32
            omega, psi = _gaussian(in_features, k, seed, self.device, f32), _gaussian(l, out_features, seed + 1,
                                                                                      self.device, f32)
            self.omega = _project_cols(Vd, omega, self.V_complement, f32)
            self.psi = _project_cols(Ud, psi.mT, dtype=f32).mT.contiguous()
            self.Y = torch.zeros(out_features, k, device=self.device)
            self.W = torch.zeros(l, in_features, device=self.device)
        self.batches = 0
        self._init_guard(self.device)

    def _state(self) -> list[torch.Tensor]:
        return [self.G] if self.strategy == "dense" else [self.Y, self.W]

    @property
    def memory_bytes(self) -> int:
        extra = [] if self.strategy == "dense" else [self.omega, self.psi]
        return sum(t.numel() * 4 for t in self._state() + extra)

    def update(self, dY: torch.Tensor, X: torch.Tensor) -> None:
        """Add one batch: output gradients ``dY`` (``(..., out)``) and inputs ``X`` (``(..., in)``), any
        float dtype, accumulated in fp32. No projection happens here (module docstring)."""
        check_tensor("dY", dY, min_ndim=1)
        check_tensor("X", X, min_ndim=1)
        out_f, in_f = self.shape
        if dY.shape[-1] != out_f or X.shape[-1] != in_f or dY.shape[:-1] != X.shape[:-1]:
            raise ValueError(f"dY must be (..., {out_f}) and X (..., {in_f}) with the same leading dims, "
                             f"got {tuple(dY.shape)} and {tuple(X.shape)}")
        dY = dY.detach().reshape(-1, out_f).to(self.device)
        X = X.detach().reshape(-1, in_f).to(self.device)
        if self.strategy == "dense":
            dYf, Xf = dY.float(), X.float()
            ok = self._admit(_sqnorm(dYf) + _sqnorm(Xf), {"dY": dY, "X": X})
            self._addmm(self.G, dYf.mT, Xf, ok)
        else:
            fused = _fused_update(dY, X, self.omega, self.psi.mT)
            if fused is not None:  # one read of the batch (accelerator path), probe folded in
                accY, accWt, probe = fused
                ok = self._admit(probe, {"dY": dY, "X": X})
                self.Y.add_(accY if ok is None else torch.where(ok, accY, 0.0))
                self.W.add_(accWt.mT if ok is None else torch.where(ok, accWt.mT, 0.0))
            else:
                dYf, Xf = dY.float(), X.float()
                P, Q = Xf @ self.omega, dYf @ self.psi.mT  # the two skinny products
                ok = self._admit(_sqnorm(P) + _sqnorm(Q), {"dY": dY, "X": X})
                self._addmm(self.Y, dYf.mT, P, ok)
                self._addmm(self.W, Q.mT, Xf, ok)
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
        for a, b in zip(self._signatures, other._signatures):
            if not same_basis(a, b):
                raise ValueError("cannot merge sketches taken against different bases")
        for mine_t, theirs_t in zip(self._state(), other._state()):
            mine_t += theirs_t.to(self.device)
        self._refused += other._refused.to(self.device)
        self.batches += other.batches
        return self

    def all_reduce(self, group=None) -> "GradientSketch":
        """Sum over the ranks of ``group`` (a no-op without a process group)."""
        batches = torch.tensor([float(self.batches)], dtype=torch.float64, device=self.device)
        all_reduce_sum_(self._state() + [batches, self._refused], group)
        self.batches = int(batches.item())
        return self

    def _bases(self, U, V):
        """The bases on the sketch's device: the given ones (checked) or the held ones (copied)."""
        return (_given_basis("U", U, self.U, self._signatures[0], self.device),
                _given_basis("V", V, self.V, self._signatures[1], self.device))

    def projected_sketch(self, U: torch.Tensor | None = None, V: torch.Tensor | None = None):
        """The finalised state, the per-batch-projected quantities: ``Σ Ĝ_b`` (dense, ``out×in``) or
        ``(ĜΩ, ΨĜ)`` summed over batches (randomized), in fp64. ``U``, ``V``: the bases given at
        construction where they are now (default: the held ones, copied to the device for this call;
        another basis raises ``ValueError``)."""
        self._finalise_checks(self._state(), "dY and X")
        U, V = self._bases(U, V)
        if self.strategy == "dense":
            G = self.G.double()
            return torch.ops.kplora.residual_projection(G, None if U is None else U.double(),
                                                        None if V is None else V.double(), 1.0, False,
                                                        self.V_complement, "torch")  # float64: torch backend
        Y = _project_cols(U, self.Y.double())
        W = _project_cols(V, self.W.double().mT, self.V_complement).mT
        return Y, W

    def mean_gradient(self, U: torch.Tensor | None = None, V: torch.Tensor | None = None) -> torch.Tensor:
        """``Ĝ`` averaged over batches (``out×in``, fp32); dense strategy only."""
        if self.strategy != "dense":
            raise NotImplementedError("the randomized strategy never forms Ĝ; use adapter_init() or strategy='dense'")
        return (self.projected_sketch(U, V) / max(self.batches, 1)).float()

    def adapter_init(self, U: torch.Tensor | None = None, V: torch.Tensor | None = None) -> torch.Tensor:
        """``A`` (``r×in``): orthonormal rows spanning the top-r right singular vectors of ``Ĝ``,
        orthogonal to ``V``; where ``Ĝ`` has fewer than r directions the rest are seeded random ones
        in the residual space. Dense strategy: a randomized top-r SVD of ``Ĝ`` (4 power iterations,
        oversampling ``max(p, r)``; ``O(out·in·r)`` instead of a full SVD's ``O(out·in·min)``), the
        full SVD only where that is no cheaper (``2(r+p) ≥ min(out, in)``). ``U``, ``V``: as for
        :meth:`projected_sketch`. Raises ``RuntimeError`` when no batch was seen, ``ValueError`` when
        batches were refused, the state overflowed or a basis is not the one given at construction."""
        if self.batches == 0:
            raise RuntimeError("adapter_init() before any update(): the gradient is unknown")
        U, V = self._bases(U, V)
        if self.strategy == "dense":
            G = self.projected_sketch(U, V).float()
            scale = G.abs().max()
            G = G / scale if float(scale) > 0 else G  # directions only: keep the products in range
            over = max(self.oversample, self.rank)
            if 2 * (self.rank + over) >= min(self.shape):
                _, S, right = torch.linalg.svd(G, full_matrices=False)
            else:
                gen = torch.Generator().manual_seed(self.seed + 3)
                _, S, right = randomized_svd(G, self.rank, over, 4, generator=gen)
        else:
            Y, W = self.projected_sketch(U, V)
            Q, _ = torch.linalg.qr(Y)
            core = torch.linalg.lstsq(self.psi.double() @ Q, W).solution  # Ĝ ≈ Q core
            _, S, right = torch.linalg.svd(core, full_matrices=False)
        # directions the gradient spans; beyond its numerical rank the singular vectors are arbitrary
        kept = int((S > S[0] * 1e-6).sum()) if S.numel() and S[0] > 0 else 0
        A = right[: min(kept, self.rank)].mT.double()
        if A.shape[1] < self.rank:  # fill with seeded random directions (projected off V below)
            A = torch.cat([A, _gaussian(self.shape[1], self.rank - A.shape[1], self.seed + 2, self.device)], 1)
        if V is not None:
            A = _project_cols(V, A, self.V_complement)
        return torch.linalg.qr(A)[0].mT.float().contiguous()
