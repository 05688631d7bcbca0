"""What both streaming sketches share (:mod:`kplora_kernels.subspace.sketch` states the contracts):
the seeded test matrices, the basis projection, the held bases and their signatures, the Triton
dispatch and the non-finite batch guard."""
from __future__ import annotations

import torch

from ..ops import resolve_sketch_backend, sketch_update


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
