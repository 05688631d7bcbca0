"""The randomized sketch update of one batch, registered with ``torch.library`` as
``kplora::sketch_update``: ``acc1 = Aᵀ(B M1)`` (``a×K``), with ``M2`` also ``acc2 = Bᵀ(A M2)``
(``b×L``), and the probe ``‖B M1‖² + ‖A M2‖²`` (float32 scalar: non-finite when the batch holds
NaN/Inf or overflows float32; read by the caller when it decides, never here).

``A``: ``tokens×a``, ``B``: ``tokens×b`` (one dtype), ``M1``: ``b×K``, ``M2``: ``a×L``. For the
gradient sketch ``A = dY``, ``B = X``, ``M1 = Ω̂``, ``M2 = Ψ̂ᵀ``; for the input sketch ``A = B = X``
without ``M2`` (docs/design.md §1). Backends: the Triton one-read kernel
(:mod:`kplora_kernels.ops.sketch_triton`) and the torch backend (two skinny GEMMs per side in
float32); :func:`kplora_kernels.ops.dispatch.resolve_sketch_backend` chooses and states its reasons.
"""
from __future__ import annotations

import torch

from .. import _checks
from . import torch_backend
from .dispatch import resolve_sketch_backend


@torch.library.custom_op("kplora::sketch_update", mutates_args=(),
                         schema="(Tensor A, Tensor B, Tensor M1, Tensor? M2, str? backend) -> (Tensor, Tensor, Tensor)")
def _sketch_update(A, B, M1, M2, backend):
    L = 0 if M2 is None else M2.shape[1]
    if resolve_sketch_backend(A, B, M1.shape[1], L, backend) == "triton":
        from . import sketch_triton

        acc1, acc2, probe = sketch_triton.sketch_update(A, B, M1, M2)
    else:
        acc1, acc2, probe = torch_backend.sketch_update(A, B, M1, M2)
    if acc2 is None:
        acc2 = acc1.new_empty(0, 0)
    return acc1.contiguous(), acc2.contiguous(), probe


@_sketch_update.register_fake
def _(A, B, M1, M2, backend):
    acc2 = A.new_empty(0, 0, dtype=torch.float32) if M2 is None else A.new_empty(B.shape[1], M2.shape[1],
                                                                              dtype=torch.float32)
    return A.new_empty(A.shape[1], M1.shape[1], dtype=torch.float32), acc2, A.new_empty((), dtype=torch.float32)


def sketch_update(A: torch.Tensor, B: torch.Tensor, M1: torch.Tensor, M2: torch.Tensor | None = None, *,
                  backend: str | None = None):
    """One batch's sketch contributions ``(Aᵀ(B M1), Bᵀ(A M2) or None, probe)`` as fresh float32
    tensors (``a×K``, ``b×L``, a scalar); see the module docstring for the shapes.

    Raises ``TypeError``/``ValueError`` naming the argument for bad input, and ``ValueError`` with the
    reasons when a forced ``backend`` (argument or ``KPLORA_BACKEND``) cannot run (see
    :func:`kplora_kernels.ops.dispatch.sketch_not_supported_reasons`)."""
    for name, t, ndim in (("A", A, 2), ("B", B, 2), ("M1", M1, 2), ("M2", M2, 2)):
        if t is not None:
            _checks.check_tensor(name, t, ndim=ndim)
    _checks.check_same_device(A=A, B=B, M1=M1, M2=M2)
    if B.shape[0] != A.shape[0]:
        raise ValueError(f"A and B must have the same number of rows (tokens), got {tuple(A.shape)} and {tuple(B.shape)}")
    if M1.shape[0] != B.shape[1]:
        raise ValueError(f"M1 must have {B.shape[1]} rows (B.shape[1]), got shape {tuple(M1.shape)}")
    if M2 is not None and M2.shape[0] != A.shape[1]:
        raise ValueError(f"M2 must have {A.shape[1]} rows (A.shape[1]), got shape {tuple(M2.shape)}")
    if not torch.compiler.is_compiling():
        resolve_sketch_backend(A, B, M1.shape[1], 0 if M2 is None else M2.shape[1], backend)
    acc1, acc2, probe = torch.ops.kplora.sketch_update(A, B, M1, M2, backend)
    return acc1, (None if M2 is None else acc2), probe
