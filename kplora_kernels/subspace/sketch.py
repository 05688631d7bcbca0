"""Streaming, mergeable estimators of the subspaces KeepLoRA++ needs (``docs/design.md`` §1).

``InputSketch``: after a task, the dominant directions of the task's inputs that the protected
basis ``V`` does not yet hold (GPM rule), from inputs seen batch by batch.
``GradientSketch``: at a task start, the top-r right singular vectors of the projected mean task
gradient ``Ĝ = (1/n) Σ_b (dY_b (I−UUᵀ))ᵀ (X_b (I−VVᵀ))`` (``out×in``), from ``(dY_b, X_b)`` pairs.

**No batch is projected.** The projections are linear and the sketches are sums, so they commute
out of the sums: with ``Ω̂ = (I−VVᵀ)Ω`` and ``Ψ̂ = Ψ(I−UUᵀ)`` formed once at construction,
``ĜΩ = (I−UUᵀ) Σ dY_bᵀ(X_b Ω̂)``, ``ΨĜ = (Σ (dY_b Ψ̂ᵀ)ᵀ X_b)(I−VVᵀ)`` and
``Σ X̂_bᵀX̂_bΩ = (I−VVᵀ) Σ X_bᵀ(X_b Ω̂)``; the dense strategy accumulates ``Σ dY_bᵀX_b`` and the
covariance ``Σ X_bᵀX_b``, projected once when the sketch is finalised. A batch costs two skinny
products (``O(tokens·(in+out)·(r+p))`` for the gradient), no projection. The complement storage of
a basis works alike (``I − VVᵀ = V_c V_cᵀ``). :mod:`kplora_kernels.subspace.reference` keeps the
per-batch-projected formulation as the test oracle.

**Bases** are validated once, at construction, and held by reference where the caller keeps them
(e.g. pinned host memory between task boundaries, :mod:`kplora_kernels.continual.placement`): a
sketch copies a basis to its device only inside construction (to form ``Ω̂``, ``Ψ̂``) and
finalisation, never between batches, so a pass over the data holds no basis on the accelerator.
Finalisation takes the same basis where it is now (e.g. brought to the device layer by layer) or
copies the held one; a basis other than the one the sketch was built against is refused
(``ValueError``, checked through a seeded probe ``gᵀB``, ``O(dim·k)``). **Non-finite batches**: each update computes a cheap
probe on the device (the squared norm of the small products, or of the inputs for the dense and
covariance strategies whose per-batch GEMM dwarfs it) in fp32: NaN, Inf, or values whose squares
overflow float32 (|x| ≳ 1e19) make it non-finite. On the CPU the probe is read at once (no
device to stall) and the batch is refused with a ``ValueError`` naming ``X`` or ``dY`` before the
state is touched. On an accelerator there is no host sync per batch: the batch's contribution is
added through ``torch.where(ok, ·, 0)`` (the state is unchanged by it) and a device counter of
refused batches is read when the sketch is finalised (``adapter_init``, ``expand``,
``mean_gradient``, ``merge``, ``all_reduce``), which then raises. A state that overflowed float32
over many batches is refused at finalisation too.

Both add up across batches, shards and data-parallel ranks (``merge``, ``all_reduce``): their state
is a sum of per-batch terms. Randomized strategies draw their test matrices from a shared seed, so
every rank draws the same ones. Orientation: ``X`` is ``tokens×in``, ``dY`` is ``tokens×out``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._checks import check_basis, check_eps, check_tensor
from ..distributed import all_reduce_sum_
from ..ops import resolve_sketch_backend, sketch_update
from .linalg import gpm_append, gpm_covariance_step, noise_floor, randomized_svd

DEFAULT_MEMORY_BUDGET = 64 * 2**20  # bytes per sketch


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


def _gaussian(rows: int, cols: int, seed: int, device, dtype=torch.float64) -> torch.Tensor:
    """The shared test matrix: the same on every rank for the same seed, returned in ``dtype`` (drawn
    in fp32 on the CPU: 4× faster than an fp64 draw, 0.12 s → 0.03 s for 5504×1024, and a Gaussian
    test matrix needs no more precision; so fp32 and fp64 hold the same values)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


WIDE_BASIS = 1024  # from this many rows a non-fp64 basis is applied in fp32 (see _project_cols)


def _project_cols(B: torch.Tensor | None, M: torch.Tensor, complement: bool = False,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(I − BBᵀ) M`` (``BBᵀ M`` when ``B`` spans the residual space; ``M`` without ``B``), returned in
    ``dtype`` (default ``M``'s), computed in fp64 except as follows.

    A basis that is not fp64 and has at least ``WIDE_BASIS`` rows is applied in fp32, its own
    precision: an fp64 copy would add nothing to the fp32 sums it projects and would cost twice the
    basis in memory (462 MiB for LLaMA-7B's down_proj at ``k_in = in/2``) and fp64 GEMM time."""
    dtype = M.dtype if dtype is None else dtype
    if B is None:
        return M.to(dtype)
    work = torch.float32 if B.dtype != torch.float64 and B.shape[0] >= WIDE_BASIS else torch.float64
    Bm, Mw = B.to(work), M.to(work)
    kept = Bm @ (Bm.mT @ Mw)
    return (kept if complement else Mw - kept).to(dtype)


# --- half-precision inputs on an accelerator ---------------------------------------------------------
# A bf16/fp16 input multiplied in fp32 (``X.float() @ M``) runs at fp32 GEMM speed: by the H200's
# datasheet (67 vs 989 dense TFLOPS, not measured here) about 1/15 of the half-precision tensor-core
# rate, so the sketches of a bf16 model's boundary pass would cost several forwards. torch ≥ 2.8
# multiplies half inputs on CUDA with fp32 accumulation *and* fp32 output (``torch.mm(a, b,
# out_dtype=torch.float32)``, the ``aten::mm.dtype`` overload). The product of two half values is exact
# in fp32, so the covariance ``Xᵀ X`` loses nothing in its products (its sums are accumulated in the
# tensor cores' fp32, not in the CPU's order). For bf16 inputs, an fp32 factor of the randomized input
# sketch (``Ω̂``, the energy's basis, the product ``X Ω̂``) is split as ``M ≈ hi + lo`` in bf16 (16
# significant bits: within 2⁻¹⁷ of ``M`` relatively for normal values above 2⁻¹¹⁰; smaller entries keep
# an absolute error below 1e-40) and multiplied as two half products. A sketch that may take the route
# (on CUDA with the overload) rounds ``Ω̂`` and the basis to that grid when it is built, so that their
# fp32 and split forms hold the same values on every rank whatever the stream's dtypes, and holds them
# split after the first such batch (the same bytes). Not routed: fp16 randomized sketches (``X Ω̂`` may
# exceed fp16's 65504); fp16 under ``torch.backends.cuda.matmul.allow_fp16_accumulation`` (torch may
# refuse the fp32 output then); ROCm; sketches of width ≤ 128, which the Triton kernel serves (it
# rounds ``Ω̂`` and ``X Ω̂`` to bf16); the gradient sketch. Elsewhere (the CPU, older torch) inputs are
# upcast. Only the ``torch.mm(..., out_dtype=)`` call is CUDA-only; the tests take this route on the
# CPU (``_EMULATE_HALF``), where ``_mm32`` upcasts.
_HALF = (torch.float16, torch.bfloat16)
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype") and torch.version.hip is None
_EMULATE_HALF = False  # tests: take the half-precision route on the CPU (products emulated in fp32)


def _half_route(X: torch.Tensor) -> bool:
    """Whether ``X``'s products take the half-precision route (see above)."""
    if X.dtype not in _HALF:
        return False
    if X.dtype == torch.float16 and getattr(torch.backends.cuda.matmul, "allow_fp16_accumulation", False):
        return False
    return (X.is_cuda and _MM_OUT_DTYPE) or _EMULATE_HALF


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in fp32 for ``a``, ``b`` of one half dtype: fp32 accumulation and output on CUDA, the
    upcast product (the same exact products) elsewhere."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _split(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``M`` (fp32) as ``hi + lo`` in bf16."""
    hi = M.to(torch.bfloat16)
    return hi, (M - hi.float()).to(torch.bfloat16)


def _mm32_split(a: torch.Tensor, parts: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``a @ (hi + lo)`` in fp32 for a bf16 ``a`` and a split factor: two half products."""
    return _mm32(a, parts[0]).add_(_mm32(a, parts[1]))


class _Factor:
    """An fp32 factor of the input sketch (``Ω̂``, the energy's basis), held once: in fp32, or after
    the first bf16 batch on the half route as its bf16 ``hi + lo`` split (the same bytes). ``grid``:
    round ``M`` to ``hi + lo`` now (exact in fp32), so that both forms hold the same values."""

    def __init__(self, M: torch.Tensor, grid: bool = False):
        if grid:
            hi, lo = _split(M)
            M = hi.float() + lo.float()
        self._fp32, self._parts = M, None

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._parts is None:
            self._parts, self._fp32 = _split(self._fp32), None
        return self._parts

    def fp32(self) -> torch.Tensor:
        """The factor in fp32: as formed, or ``hi + lo`` after the split (exact in fp32)."""
        if self._fp32 is not None:
            return self._fp32
        return self._parts[0].float() + self._parts[1].float()

    @property
    def nbytes(self) -> int:
        return self._fp32.nbytes if self._fp32 is not None else sum(t.nbytes for t in self._parts)


def complement_basis(V: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (``dim×(dim−k)``) of the orthogonal complement of ``V`` (``dim×k``)."""
    Q = torch.linalg.qr(V.double(), mode="complete")[0]
    return Q[:, V.shape[1]:].to(V.dtype).contiguous()


def _to(B: torch.Tensor, device) -> torch.Tensor:
    """``B`` on ``device`` (no copy when it is there; asynchronous from pinned host memory, ordered
    on the current stream)."""
    return B.to(device, non_blocking=B.device.type == "cpu" and B.is_pinned())


def basis_signature(B: torch.Tensor | None):
    """What identifies a basis cheaply, wherever it lives: its shape and a seeded probe ``gᵀB``
    (``k`` floats, fp32 or fp64 as ``B``) on the CPU."""
    if B is None:
        return None
    work = torch.float64 if B.dtype == torch.float64 else torch.float32
    # one probe for every dtype (drawn in fp32), so a copy of the basis in another dtype matches too
    g = torch.randn(B.shape[0], generator=torch.Generator().manual_seed(20261129)).to(work)
    return tuple(B.shape), (g.to(B.device) @ B.detach().to(work)).cpu()


def same_basis(a, b) -> bool:
    """Two signatures that agree in shape and probe values (to ``1e-3`` absolute on probe values of
    order 1: a copy of the basis on any device passes, another basis fails unless it is within about
    ``1e-3`` of this one)."""
    if a is None or b is None:
        return a is None and b is None
    return a[0] == b[0] and torch.allclose(a[1].double(), b[1].double(), rtol=1e-4, atol=1e-3)


def _given_basis(name: str, given, held, held_signature, device):
    """The basis for a finalisation: ``given`` (checked to be the one the sketch was built against)
    or the ``held`` reference, on ``device``."""
    if given is not None and held is None and given.shape[-1] == 0:
        given = None  # an empty basis is no basis
    if given is None:
        return None if held is None else _to(held, device)
    if held is None:
        raise ValueError(f"{name}: this sketch was built without a basis {name}; got one of shape {tuple(given.shape)}")
    if not same_basis(basis_signature(given), held_signature):
        raise ValueError(f"{name}: not the basis this sketch was built against (built with shape "
                         f"{held_signature[0]}, given {tuple(given.shape)} with other values); pass the same {name}")
    return _to(given.detach(), device)


def _all_reduce(tensors, group) -> None:
    all_reduce_sum_(tensors, group)


def _fused_usable(A: torch.Tensor, B: torch.Tensor, K: int, L: int = 0) -> bool:
    """Whether the dispatcher sends this update to the Triton one-read kernel; the torch forms of the
    sketches serve otherwise. A forced backend (``KPLORA_BACKEND``) that cannot run raises
    ``ValueError`` with its reasons (:func:`kplora_kernels.ops.sketch_not_supported_reasons`)."""
    return resolve_sketch_backend(A, B, K, L) == "triton"


def _fused_update(A: torch.Tensor, B: torch.Tensor, M1: torch.Tensor, M2: torch.Tensor | None = None):
    """The op ``kplora::sketch_update`` on the Triton kernel where the dispatcher picks it, else None."""
    if not _fused_usable(A, B, M1.shape[1], 0 if M2 is None else M2.shape[1]):
        return None
    return sketch_update(A, B, M1, M2, backend="triton")


def _sqnorm(t: torch.Tensor) -> torch.Tensor:
    """``‖t‖²`` as an fp32 device scalar (non-finite for NaN/Inf or squares beyond float32)."""
    if t.dtype == torch.float64:  # vector_norm does not narrow; values beyond float32 become Inf here
        t = t.float()
    return torch.linalg.vector_norm(t.reshape(-1), dtype=torch.float32).square()


def _refusal(named: dict, what: str) -> ValueError:
    """The error for a refused batch: which argument holds NaN/Inf, else which overflows float32."""
    for name, t in named.items():
        if not bool(torch.isfinite(t).all()):
            return ValueError(f"{name} contains NaN or Inf; the batch was not accumulated (the {what} is unchanged)")
    sizes = ", ".join(f"max |{n}| = {float(t.abs().max()):.3g}" for n, t in named.items())
    return ValueError(f"{' or '.join(named)} is too large for the float32 {what} (its products overflow float32: "
                      f"{sizes}); scale the inputs down. The batch was not accumulated (the {what} is unchanged)")


class _Guard:
    """The non-finite contract shared by both sketches (see the module docstring)."""

    def _init_guard(self, device: torch.device) -> None:
        self._deferred = device.type != "cpu"
        self._refused = torch.zeros((), dtype=torch.int64, device=device)

    def _admit(self, probe: torch.Tensor, named: dict):
        """None: accumulate in place (checked now). A device bool: accumulate through ``where``."""
        ok = torch.isfinite(probe)
        if not self._deferred:
            if not bool(ok):
                raise _refusal(named, "sketch")
            return None
        self._refused += (~ok).to(torch.int64)
        return ok

    @staticmethod
    def _addmm(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ok) -> None:
        if ok is None:
            target.addmm_(a, b)
        else:
            target.add_(torch.where(ok, a @ b, 0.0))

    @staticmethod
    def _add(target: torch.Tensor, product: torch.Tensor, ok) -> None:
        target.add_(product if ok is None else torch.where(ok, product, 0.0))

    def _finalise_checks(self, state: list[torch.Tensor], names: str) -> None:
        refused = int(self._refused.item())
        if refused:
            raise ValueError(f"{refused} batch(es) were refused: {names} contained NaN/Inf or values whose products "
                             "overflow float32; they were not accumulated. Fix the inputs and sketch the task again")
        for t in state:
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"the float32 sketch state overflowed: the accumulated {names} are too large "
                                 "(sums of products beyond 3.4e38); scale the inputs down")


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
        self._half_grid = (self.device.type == "cuda" and _MM_OUT_DTYPE) or _EMULATE_HALF
        if strategy == "auto":
            strategy = "covariance" if 4 * dim * dim <= memory_budget else "randomized"
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
            width = width or max(1, min(dim, memory_budget // (4 * dim), 1024))
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
        _all_reduce([self.state, self.energy, tokens, self._refused], group)
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


def _nystrom(Y: torch.Tensor, Om: torch.Tensor, nu: float):
    """Stable Nyström approximation (Tropp et al. 2017) of a PSD ``C`` from ``Y = C Ω`` (fp64):
    eigenvalues (descending, the shift ``nu`` removed), a function returning the first ``c``
    orthonormal eigenvectors (only those are formed: ``dim·w·c`` instead of ``dim·w²``) and one
    returning ``Uᵀ M`` for all of them. The core
    ``Ωᵀ(Y + νΩ)`` is inverted through its eigendecomposition, so a rank-deficient ``C`` or an
    ``Ω`` with dependent columns is fine."""
    Yn = Y + nu * Om
    core = Om.mT @ Yn
    lam, W = torch.linalg.eigh((core + core.mT) / 2)
    keep = lam > lam.max().clamp_min(0) * 1e-12
    if not bool(keep.any()):
        return Y.new_zeros(0), lambda c: Y.new_zeros(Y.shape[0], 0), lambda M: Y.new_zeros(0, M.shape[1])
    F = W[:, keep] / lam[keep].sqrt()  # Ĉ_ν = (Yn F)(Yn F)ᵀ
    G = F.mT @ (Yn.mT @ Yn) @ F
    s2, Z = torch.linalg.eigh((G + G.mT) / 2)
    s2, Z = s2.flip(0), Z.flip(1)
    good = s2 > s2[0].clamp_min(0) * 1e-14
    s2, Z = s2[good], Z[:, good]
    coef = F @ Z / s2.sqrt()  # eigenvectors = Yn @ coef
    return (s2 - nu).clamp_min(0), lambda c: Yn @ coef[:, :c], lambda M: coef.mT @ (Yn.mT @ M)


def _nystrom_pp(Y: torch.Tensor, Om: torch.Tensor, nu: float) -> float:
    """Nyström++ (Persson, Cortinovis & Kressner 2022) trace estimate of PSD ``A`` from ``Y = A Om``:
    the Nyström approximation from the first 3/4 of the columns plus Hutchinson on the last 1/4."""
    w2 = Y.shape[1] // 4
    if w2 < 1:
        return float(_nystrom(Y, Om, nu)[0].sum())
    w1 = Y.shape[1] - w2
    e1, _, U1t = _nystrom(Y[:, :w1], Om[:, :w1], nu)
    probes = Om[:, w1:]
    hutch = float((probes * Y[:, w1:]).sum()) - float((e1 * U1t(probes).pow(2).sum(1)).sum())
    return float(e1.sum()) + hutch / w2


def _xnystrace(Y: torch.Tensor, Om: torch.Tensor, dims: int) -> float | None:
    """XNysTrace (Epperly, Tropp & Webber, "XTrace: making the most of every sample in stochastic
    trace estimation", SIMAX 2024): the exchangeable Nyström trace estimate of PSD ``A`` from
    ``Y = A Om``, ``Om`` Gaussian with its columns in a ``dims``-dimensional subspace. Every column
    serves both as a Nyström column (the approximation from the others) and as a Hutchinson probe
    (of what that approximation misses); the estimates are averaged. Same matrix products as
    Nyström++, lower spread (see :class:`InputSketch`). None where ``Omᵀ Y`` is not positive definite."""
    Y, Om = Y.double(), Om.double()
    nu = torch.finfo(torch.float64).eps * float(Y.norm()) / math.sqrt(max(dims, 1))
    Y = Y + nu * Om  # the shift keeps the core positive definite; its trace nu·dims is removed below
    H = Om.mT @ Y
    C, info = torch.linalg.cholesky_ex((H + H.mT) / 2, upper=True)  # H = CᵀC
    if int(info) != 0:
        return None
    Q, R = torch.linalg.qr(Y)
    B = torch.linalg.solve_triangular(C, R, upper=True, left=False)  # the approximation is Q B Bᵀ Qᵀ
    S = torch.linalg.solve_triangular(C.mT, B, upper=False, left=False)  # B C⁻ᵀ
    S = S * torch.cholesky_inverse(C, upper=True).diagonal().rsqrt()
    ests = B.pow(2).sum() - S.pow(2).sum(0) + (S * (Q.mT @ Om)).sum(0).pow(2) - nu * dims
    return float(ests.mean())


def gradient_strategy(out_features: int, in_features: int, rank: int, oversample: int = 8,
                      memory_budget: int = DEFAULT_MEMORY_BUDGET) -> str:
    """What ``GradientSketch(strategy="auto")`` takes: ``"dense"`` only where it fits in
    ``memory_budget`` bytes *and* costs no more per token than the thin sketch
    (``out·in ≤ (out+in)·(k+l)`` multiply-adds, ``k = r+p``, ``l = 2k+1``): small layers. Everywhere
    else the thin sketch, whose accuracy for the adapter is tested (≥ 0.99 of the top-r energy of
    a low-rank-plus-noise gradient)."""
    k = min(rank + oversample, out_features, in_features)
    l = min(2 * k + 1, out_features)
    dense_fits = 4 * out_features * in_features <= memory_budget
    dense_cheap = out_features * in_features <= (out_features + in_features) * (k + l)
    return "dense" if dense_fits and dense_cheap else "randomized"


def gradient_sketch_bytes(out_features: int, in_features: int, rank: int, oversample: int = 8,
                          memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """``GradientSketch(...).memory_bytes`` for the ``"auto"`` strategy, without allocating it."""
    if gradient_strategy(out_features, in_features, rank, oversample, memory_budget) == "dense":
        return 4 * out_features * in_features
    k = min(rank + oversample, out_features, in_features)
    l = min(2 * k + 1, out_features)
    return 4 * (out_features * k + l * in_features + in_features * k + l * out_features)


def input_sketch_bytes(dim: int, stored: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """``InputSketch(dim, V, memory_budget=...).memory_bytes`` for the ``"auto"`` strategy and a stored
    basis of ``stored`` columns (either form), without allocating it: the covariance, or the residual
    sketch, its test matrix and (exact residual energy, ``stored ≤ width``) the basis on the device."""
    if 4 * dim * dim <= memory_budget:
        return 4 * dim * dim
    width = max(1, min(dim, memory_budget // (4 * dim), 1024))
    held = 4 * dim * stored if 0 < stored <= width else 0
    return 2 * 4 * dim * width + held


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
            k = min(rank + oversample, out_features, in_features)
            l = min(2 * k + 1, out_features)
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
        _all_reduce(self._state() + [batches, self._refused], group)
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
