"""``InputSketch``: after a task, the dominant directions of the task's inputs that the protected
basis ``V`` does not yet hold (GPM rule, ``docs/design.md`` §1), from inputs seen batch by batch;
:class:`Expansion` reports what an expansion did. Contracts shared with the gradient sketch (no
batch projected, held bases, non-finite batches, merging): :mod:`kplora_kernels.subspace.sketch`.
Orientation: ``X`` is ``tokens×dim``, bases ``dim×k``."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._checks import check_basis, check_eps, check_tensor
from ..distributed import all_reduce_sum_
from .common import (_fused_update, _fused_usable, _gaussian, _given_basis, _Guard, _project_cols,
                     _sqnorm, _to, basis_signature, same_basis)
from .half import _Factor, _half_route, _mm32, _mm32_split, _split, half_grid
from .linalg import gpm_append, gpm_covariance_step, noise_floor
from .nystrom import _nystrom, _nystrom_pp, _xnystrace
from .sizing import DEFAULT_MEMORY_BUDGET, input_sketch_width, input_strategy


class Expansion(NamedTuple):
    """What :meth:`InputSketch.expand` did (its ``expansion`` attribute after the call).

    ``appended``: directions appended to the basis. ``energy``: the fraction of the sketched inputs'
    energy ``‖X‖²`` lying in the protected span of the returned basis (``(E − ‖R‖² + Σ_appended s_j²)
    / E``, docs/design.md §1; 1.0 for inputs of zero energy). Covariance strategy: exact (to fp32
    rounding). Randomized: the part already in ``span(V)`` is exact where ``exact_residual`` (else
    the XNysTrace estimate), the appended part the Nyström eigenvalues, which never exceed the
    energy those directions really capture (a lower bound). ``saturated``: the randomized sketch
    appended every direction it can resolve (at most ``width``) while ``energy < eps`` and the
    residual still has room; a further pass over the same inputs with a sketch built against the
    returned basis captures more (it always appends ≥ 1 direction: ``saturated`` implies
    ``appended ≥ 1``). Never set for the covariance strategy. ``width``: the randomized sketch's
    width, None for the covariance strategy."""

    appended: int
    energy: float
    saturated: bool
    width: int | None


class InputSketch(_Guard):
    """Accumulates inputs ``X`` (``(..., dim)``) of one task to expand the basis ``V`` by the GPM rule.

    Strategies: ``"covariance"`` keeps ``Σ Xᵀ X`` exactly (``dim²`` floats), gives exactly the GPM
    result of the stacked inputs and serves any basis at :meth:`expand`, so one sketch of an input
    shared by several weights (q, k, v of a block) serves all of them. ``"randomized"`` keeps the
    Nyström sketch ``S = Σ Xᵀ (X Ω̂)`` with ``Ω̂ = (I − VVᵀ) Ω`` (``dim×width`` floats, ``Ω`` from
    ``seed``), whose projection ``(I − VVᵀ) S`` is the sketch of the *residual* covariance; it is tied
    to the basis ``V`` (``dim×k``) given here, which :meth:`expand` must be given again. ``"auto"``
    takes the exact one when it fits in ``memory_budget`` bytes. ``strategy`` and ``memory_bytes``
    tell what was chosen.

    The GPM rule needs the residual energy ``‖X (I − VVᵀ)‖²``. The covariance strategy has it
    exactly (``tr C − tr VᵀCV`` at finalisation). The randomized one (``residual``):

    - ``"exact"`` accumulates ``‖X V‖²`` per batch (``V`` as stored, so ``min(k, dim−k)`` columns):
      a ``tokens×dim×stored`` product on top of the sketch's two ``tokens×dim×width`` ones, and the
      stored basis on the device for the pass (``memory_bytes`` counts it);
    - ``"estimate"`` costs nothing per batch: XNysTrace (Epperly, Tropp & Webber 2024) on the
      sketch — every column both a Nyström column and a Hutchinson probe of what the others' Nyström
      approximation misses, averaged. Unbiased; measured (dim 1024, width 256, 10 seeds) at most
      0.0002 of the captured fraction for a fast ``0.97^j`` spectrum, but a standard deviation of
      0.0012–0.0020 (max 0.0032) for a slow ``1/j`` spectrum over all dimensions — above the 0.002
      a GPM decision should be accurate to (Nyström++, used before: 0.0021–0.0025, max 0.0038);
    - ``"auto"`` (default): exact while the stored basis has at most ``width`` columns (the extra
      product then costs at most half the sketch's own), the estimate beyond (e.g. LLaMA-7B's
      down_proj, 11008 inputs, width 1024, at ``k_in`` in the thousands). ``exact_residual`` tells
      which was chosen.
    """

    TRIANGLE_MIN_DIM = 1024  # the covariance accumulates block-triangularly from this dimension on

    def __init__(self, dim: int, V: torch.Tensor | None = None, *, V_complement: bool = False,
                 strategy: str = "auto", width: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 seed: int = 0, device=None, residual: str = "auto"):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int ≥ 1, got {dim!r}")
        if strategy not in ("auto", "covariance", "randomized"):
            raise ValueError(f"strategy must be 'auto', 'covariance' or 'randomized', got {strategy!r}")
        if residual not in ("auto", "exact", "estimate"):
            raise ValueError(f"residual must be 'auto', 'exact' or 'estimate', got {residual!r}")
        if V is not None:
            check_basis("V", V, dim, "dim")
            device = V.device if device is None else device
        self.dim, self.seed = dim, seed
        self.device = torch.device(device or "cpu")
        # whether bf16 batches may take the half route here (see _half_route): its factors then sit on its grid
        self._half_grid = half_grid(self.device)
        if strategy == "auto":
            strategy = input_strategy(dim, memory_budget)
        self.strategy = strategy
        keep_V = strategy == "randomized" and V is not None and (V.shape[1] > 0 or V_complement)
        # held where the caller keeps it (its own dtype: validated as such); copied only when used
        self.V = V.detach() if keep_V else None
        self._V_signature = basis_signature(self.V)
        self.V_complement = V_complement and keep_V
        Vd = None if self.V is None else _to(self.V, self.device)  # on the device for construction only
        if strategy == "covariance":
            # the upper block triangle of Σ XᵀX (column blocks of ~dim/4 from TRIANGLE_MIN_DIM on: 10/16
            # of the full product's work, about 0.68× its time on 2 CPU cores at dim 2048–4096); the
            # lower blocks are mirrored in place when the sketch is read (covariance())
            nb = 4 if dim >= self.TRIANGLE_MIN_DIM else 1
            step = -(-dim // nb)
            self._blocks = [(lo, min(lo + step, dim)) for lo in range(0, dim, step)]
            self._mirrored = False
            self.state = torch.zeros(dim, dim, device=self.device)
        else:
            width = width or input_sketch_width(dim, memory_budget)
            if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= dim:
                raise ValueError(f"width must be an int in [1, dim = {dim}], got {width!r}")
            omega = _gaussian(dim, width, seed, self.device, torch.float32)
            # Ω̂, formed once (on the half route's grid where this sketch may take it)
            self._omega = _Factor(_project_cols(Vd, omega, self.V_complement, torch.float32), self._half_grid)
            self.state = torch.zeros(dim, width, device=self.device)
        self.width = self.state.shape[1]
        # the exact residual energy where it costs at most half the sketch's own per-batch products
        stored = 0 if self.V is None else self.V.shape[1]
        self.exact_residual = self.V is not None and (
            residual == "exact" or (residual == "auto" and stored <= self.width))
        # on the device for every batch (auto: at most width columns), counted in memory_bytes
        self._Vf = _Factor(Vd.float(), self._half_grid) if self.exact_residual else None
        # ‖X‖² and (exact_residual) ‖X V‖², accumulated in fp64
        self.energy = torch.zeros(2 if self.exact_residual else 1, dtype=torch.float64, device=self.device)
        self.tokens = 0
        self.expansion: Expansion | None = None  # set by each expand()
        self._init_guard(self.device)

    @property
    def omega(self) -> torch.Tensor:
        """The projected test matrix ``Ω̂`` (``dim×width``, fp32) of the randomized strategy."""
        return self._omega.fp32()

    @property
    def memory_bytes(self) -> int:
        extra = self._omega.nbytes if self.strategy == "randomized" else 0
        if self._Vf is not None:
            extra += self._Vf.nbytes
        return self.state.numel() * 4 + extra

    def update(self, X: torch.Tensor) -> None:
        """Add a batch of inputs ``(..., dim)`` of any float dtype (accumulated in fp32). A batch with
        NaN/Inf or values whose squares overflow float32 is refused (see the module docstring)."""
        check_tensor("X", X, min_ndim=1)
        if X.shape[-1] != self.dim:
            raise ValueError(f"X must have shape (..., {self.dim}), got {tuple(X.shape)}")
        X = X.detach().reshape(-1, self.dim).to(self.device)
        e = _sqnorm(X)  # ‖X‖²: the rule's denominator, and the probe (its GEMM dwarfs this read)
        fused = (_fused_update(X, X, self.omega)  # asked first: self.omega may be formed from its split
                 if self.strategy == "randomized" and _fused_usable(X, X, self.width) else None)
        half = _half_route(X)
        split = half and X.dtype == torch.bfloat16  # fp32 factors multiply as bf16 hi + lo
        Xf = None
        if fused is not None:  # one read of the batch (accelerator path), its probe folded in
            acc, _, probe = fused
            ok = self._admit(e + probe, {"X": X})
            self.state.add_(acc if ok is None else torch.where(ok, acc, 0.0))
        elif half and (self.strategy == "covariance" or split):
            ok = self._admit(e, {"X": X})  # half products with fp32 output (see _half_route)
            if self.strategy == "covariance":
                self._upper_only()
                for lo, hi in self._blocks:
                    self._add(self.state[lo:hi, lo:], _mm32(X[:, lo:hi].mT, X[:, lo:]), ok)
            else:
                Z = _mm32_split(X, self._omega.split())
                self._add(self.state, _mm32_split(X.mT, _split(Z)), ok)
        else:
            Xf = X.float()
            ok = self._admit(e, {"X": X})
            if self.strategy == "covariance":
                self._upper_only()
                for lo, hi in self._blocks:
                    self._addmm(self.state[lo:hi, lo:], Xf[:, lo:hi].mT, Xf[:, lo:], ok)
            else:
                self._addmm(self.state, Xf.mT, Xf @ self.omega, ok)
        if self.exact_residual:
            if Xf is None and split:
                XV = _mm32_split(X, self._Vf.split())
            else:
                XV = (X.float() if Xf is None else Xf) @ self._Vf.fp32()
            e = torch.stack([e, _sqnorm(XV)])
        self.energy += e.double() if ok is None else torch.where(ok, e.double(), 0.0)
        self.tokens += X.shape[0]

    def _upper_only(self) -> None:
        """Back to the accumulating form (lower off-diagonal blocks zero) after :meth:`covariance`."""
        if self.strategy == "covariance" and self._mirrored:
            for lo, hi in self._blocks:
                self.state[hi:, lo:hi] = 0
            self._mirrored = False

    def covariance(self) -> torch.Tensor:
        """``Σ XᵀX`` (``dim×dim``, fp32, symmetric): the covariance strategy's state with its lower
        blocks mirrored from the upper ones in place (no copy; later updates undo it first)."""
        if self.strategy != "covariance":
            raise ValueError("covariance() belongs to the covariance strategy; the randomized one keeps a sketch")
        if not self._mirrored:
            for lo, hi in self._blocks:
                self.state[hi:, lo:hi] = self.state[lo:hi, hi:].mT
            self._mirrored = True
        return self.state

    def _check_compatible(self, other: "InputSketch") -> None:
        if not isinstance(other, InputSketch):
            raise TypeError(f"can only merge another InputSketch, got {type(other).__name__}")
        mine = (self.dim, self.strategy, self.width, self.seed, self.V_complement)
        theirs = (other.dim, other.strategy, other.width, other.seed, other.V_complement)
        if mine != theirs:
            raise ValueError(f"cannot merge sketches of different configuration (dim, strategy, width, seed): "
                             f"{mine} vs {theirs}")
        if not same_basis(self._V_signature, other._V_signature):
            raise ValueError("cannot merge sketches taken against different bases V")

    def merge(self, other: "InputSketch") -> "InputSketch":
        """Add ``other`` (same configuration and basis) into this sketch; returns self."""
        self._check_compatible(other)
        self._upper_only()
        other._upper_only()
        self.state += other.state.to(self.device)
        self.energy += other.energy.to(self.device)
        self._refused += other._refused.to(self.device)
        self.tokens += other.tokens
        return self

    def all_reduce(self, group=None) -> "InputSketch":
        """Sum the sketch over the ranks of ``group`` (a no-op without a process group)."""
        tokens = torch.tensor([float(self.tokens)], dtype=torch.float64, device=self.device)
        self._upper_only()
        all_reduce_sum_([self.state, self.energy, tokens, self._refused], group)
        self.tokens = int(tokens.item())
        return self

    def residual_sketch(self, V: torch.Tensor | None = None) -> torch.Tensor:
        """The randomized strategy's finalised sketch ``C_R Ω = (I − VVᵀ) Σ Xᵀ(X Ω̂)`` (``dim×width``,
        fp64), ``C_R`` the residual covariance. ``V``: the basis given at construction where it is now
        (default: the held one, copied to the sketch's device for this call)."""
        if self.strategy != "randomized":
            raise ValueError("residual_sketch() belongs to the randomized strategy; the covariance one keeps Σ XᵀX")
        V = _given_basis("V", V, self.V, self._V_signature, self.device)
        return _project_cols(V, self.state.double(), self.V_complement)

    def _own_basis(self, V, complement: bool):
        """The randomized sketch's basis as a caller passes it again (None: use the held one)."""
        if complement != self.V_complement and (V is not None or complement):
            raise ValueError(f"V_complement: this sketch was built with V_complement={self.V_complement}, "
                             f"got {complement}")
        if V is None or (self.V is None and V.shape[1] == 0 and not complement):
            return None
        return V

    def _nystrom_spectrum(self, V: torch.Tensor | None = None):
        """Eigenvalues (descending) and the eigenvectors (``vecs(c)``: the first ``c``, ``dim×c``, residual
        space) of the stable Nyström approximation of the residual covariance, and its trace: exact
        (``exact_residual``, or ‖X‖² without a basis) or the XNysTrace estimate."""
        Y, Om = self.residual_sketch(V), self.omega.double()
        nu = math.sqrt(self.dim) * torch.finfo(torch.float32).eps * float(Y.norm())
        evals, vecs, _ = _nystrom(Y, Om, nu)
        if self.exact_residual:  # ‖X V‖² was accumulated: the residual energy is exact
            inside = float(self.energy[1])
            residual = inside if self.V_complement else float(self.energy[0]) - inside
        elif self.V is None:
            residual = float(self.energy[0])
        else:
            stored = self.V.shape[1]
            dims = stored if self.V_complement else self.dim - stored  # where Ω̂'s columns live
            estimate = _xnystrace(Y, Om, dims)
            if estimate is None:  # Ω̂ rank-deficient (more columns than residual dimensions): Nyström++
                estimate = _nystrom_pp(Y, Om, nu)
            trace_low = float(evals.sum())  # Nyström ⪯ C_R: a lower bound of the trace
            residual = min(max(estimate, trace_low), float(self.energy[0]))
        return evals, vecs, residual

    def residual_energy(self, V: torch.Tensor | None = None, complement: bool = False) -> float:
        """``‖X (I − VVᵀ)‖²`` over the accumulated inputs: exact for the covariance strategy (for the
        given ``V``); for the randomized one, exact or the XNysTrace estimate (``residual``) against
        its own ``V`` — given again where it is now (checked: ``ValueError`` for another basis) or
        the held one."""
        self._finalise_checks([self.state], "inputs X")
        if self.strategy == "randomized":  # its own V: the given one (checked) where it is now, else the held one
            return self._nystrom_spectrum(self._own_basis(V, complement))[2]
        C = self.covariance().double()
        if V is None or (V.shape[1] == 0 and not complement):
            return float(C.diagonal().sum())
        Vd = V.to(self.device).double()
        inside = float((Vd * (C @ Vd)).sum())
        return inside if complement else float(C.diagonal().sum()) - inside

    def top_residual_directions(self, count: int, V: torch.Tensor | None = None,
                                complement: bool = False) -> torch.Tensor:
        """The ``count`` leading eigenvectors (``dim×c``, fp64, ``c ≤ count``, in the residual space) of
        the residual input covariance ``(I − VVᵀ) Σ XᵀX (I − VVᵀ)``: exact for the covariance strategy
        (for the given ``V``; ``complement``: ``V`` spans the residual space), the stable Nyström
        approximation for the randomized one (its own ``V``, given again or held, as for
        :meth:`residual_energy`). InfLoRA's task-start design uses them. Raises ``ValueError`` for a
        bad ``count``, another basis, or when batches were refused."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an int ≥ 0, got {count!r}")
        self._finalise_checks([self.state], "inputs X")
        if self.strategy == "randomized":
            return self._nystrom_spectrum(self._own_basis(V, complement))[1](count)
        C = self.covariance().double()
        if V is not None and (V.shape[1] or complement):
            Vd = V.to(self.device).double()
            if complement:  # the residual covariance lives in span(V): decompose Vᵀ C V
                M = Vd.mT @ C @ Vd
                evals, W = torch.linalg.eigh((M + M.mT) / 2)
                return Vd @ W.flip(1)[:, :count]
            C = C - Vd @ (Vd.mT @ C)
            C = C - (C @ Vd) @ Vd.mT
        evals, evecs = torch.linalg.eigh((C + C.mT) / 2)
        return evecs.flip(1)[:, :count]

    def expand(self, V: torch.Tensor | None, eps: float, *, V_complement: bool = False,
               keep_free: int = 0) -> torch.Tensor:
        """``V`` extended by the GPM rule (:func:`~kplora_kernels.subspace.linalg.gpm_count`, the one
        implementation): append residual directions while ``(E − ‖R‖² + Σ_appended s_j²) / E < eps``,
        leaving at least ``keep_free`` residual dimensions. With ``V_complement=True`` both the given
        and the returned basis span the residual space (the complement shrinks instead of ``V``
        growing). Returns ``dim×k'`` in fp32 (or V's dtype). Covariance strategy: only the appended
        eigenpairs are computed (growing subspace iteration, ``eigh`` when the count nears the
        residual dimension). Randomized strategy: at most ``width`` directions per call.

        Sets ``self.expansion`` (:class:`Expansion`: the count appended, the energy fraction reached,
        whether the sketch saturated). The GPM rule over inputs that need more directions than the
        width is met by further passes: while ``expansion.saturated``, sketch the same inputs again
        against the returned basis and expand once more; each pass measures what the previous ones
        left, so the passes converge to the exact rule. Raises ``ValueError`` when batches were
        refused or the state overflowed."""
        eps = check_eps("eps", eps)
        if V is not None:
            check_basis("V", V, self.dim, "dim")
            V = V.detach().to(self.device)
            if V.shape[1] == 0 and not V_complement:
                V = None
        if V is None and V_complement:
            raise ValueError("V_complement=True needs the complement basis V")
        if self.strategy == "randomized" and ((V is None) != (self.V is None) or V_complement != self.V_complement
                                              or not same_basis(basis_signature(V), self._V_signature)):
            raise ValueError("the randomized sketch projects against the basis V it was built with: "
                             "expand must be given that basis")
        self._finalise_checks([self.state], "inputs X")
        base = torch.zeros(self.dim, 0, device=self.device) if V is None else V
        residual_dims = base.shape[1] if V_complement else self.dim - base.shape[1]
        total = float(self.energy[0])
        limit = residual_dims - keep_free
        width = self.width if self.strategy == "randomized" else None
        if total == 0:
            self.expansion = Expansion(0, 1.0, False, width)
            return base.clone()
        floor = noise_floor(torch.float32)  # the state is accumulated in fp32
        if self.strategy == "covariance":
            # the state holds fp32 sums: fp64 decompositions add nothing but time at large dims
            # (a 2048² eigh: about 4× slower in fp64 on 2 cores); small dims stay in fp64
            C = self.covariance()
            C = C.double() if self.dim < 1024 else C
            step = gpm_covariance_step(C, base, eps, complement=V_complement, total=total,
                                       keep_free=keep_free, floor=floor, seed=self.seed)
            self.expansion = Expansion(step.appended, step.energy, False, None)
            return step.basis
        evals, vecs, residual = self._nystrom_spectrum(V)
        step = gpm_append(base, evals, vecs, total=total, captured=total - residual, eps=eps, limit=limit,
                          floor=floor, complement=V_complement)
        # the sketch offered fewer directions than the rule wants: a further pass against the new basis
        saturated = 0 < step.appended < limit and step.energy < eps
        self.expansion = Expansion(step.appended, step.energy, saturated, width)
        return step.basis
