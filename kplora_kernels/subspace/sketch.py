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
a basis works alike (``I − VVᵀ = V_c V_cᵀ``). The tests hold the per-batch-projected sums as their
float64 oracle (``tests/oracles.py``).

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

Modules (this one states the contracts and re-exports their names): :mod:`.input_sketch`
(``InputSketch``, ``Expansion``), :mod:`.gradient_sketch` (``GradientSketch``), :mod:`.sizing` (the
one rule sizing both from a memory budget), :mod:`.common` (test matrices, bases, the Triton
dispatch, the non-finite guard), :mod:`.half` (the half-precision route), :mod:`.nystrom`; the GPM
recipe both strategies of the input sketch follow is :func:`.linalg.gpm_append`.
"""
from __future__ import annotations

from .common import basis_signature, complement_basis, same_basis
from .gradient_sketch import GradientSketch
from .half import _MM_OUT_DTYPE, _half_route  # noqa: F401  (read by tests/test_sketch_kernels.py)
from .input_sketch import Expansion, InputSketch
from .sizing import (DEFAULT_MEMORY_BUDGET, gradient_sketch_bytes, gradient_sketch_sizes, gradient_strategy,
                     input_sketch_bytes, input_sketch_width, input_strategy)

__all__ = ["DEFAULT_MEMORY_BUDGET", "Expansion", "GradientSketch", "InputSketch", "basis_signature",
           "complement_basis", "gradient_sketch_bytes", "gradient_sketch_sizes", "gradient_strategy",
           "input_sketch_bytes", "input_sketch_width", "input_strategy", "same_basis"]
