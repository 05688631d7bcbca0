"""The half-precision route of the input sketch's products on an accelerator (the comment below
explains when it is taken). ``_EMULATE_HALF`` lets the tests take it on the CPU: read it through
:func:`half_grid` and :func:`_half_route`, never by importing the name."""
from __future__ import annotations

import torch

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


def half_grid(device: torch.device) -> bool:
    """Whether a sketch on ``device`` may take the half route, so that its fp32 factors must sit on the
    bf16 ``hi + lo`` grid from the start (see :class:`_Factor`)."""
    return (device.type == "cuda" and _MM_OUT_DTYPE) or _EMULATE_HALF
