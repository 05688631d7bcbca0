"""Input validation shared by every public function.

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, value or
device) with a message naming the argument, what was expected and what was found.
"""
from __future__ import annotations

import os

import torch

_check_orthonormal = os.environ.get("KPLORA_CHECK_BASES", "1") != "0"


def set_orthonormality_check(enabled: bool) -> bool:
    """Switch the orthonormality check on bases globally; returns the previous setting.

    The check costs two thin products with a few probe vectors per basis. It can also be turned off
    with the environment variable ``KPLORA_CHECK_BASES=0``.
    """
    global _check_orthonormal
    previous, _check_orthonormal = _check_orthonormal, bool(enabled)
    return previous


def check_tensor(name: str, t, *, ndim: int | None = None, min_ndim: int | None = None) -> None:
    """``t`` must be a floating-point tensor with ``ndim`` (or at least ``min_ndim``) dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(t.shape)}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Every entry of ``t`` must be finite (no NaN, no ±Inf): one pass over ``t``."""
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = t[~torch.isfinite(t)]
        raise ValueError(f"{name} must be finite, but {bad.numel()} of its {t.numel()} entries are not "
                         f"(first: {bad.flatten()[0].item()})")


def check_same_device(**tensors) -> None:
    """All given (non-None) tensors must live on one device."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    if not named:
        return
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}; "
                             "move them to one device")


def check_eps(name: str, eps) -> float:
    """An energy threshold must be a number in (0, 1]."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(eps).__name__}")
    if not 0.0 < float(eps) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {eps}")
    return float(eps)


def _orthonormality_tolerance(dtype: torch.dtype) -> float:
    # Rounding an exactly orthonormal basis to `dtype` moves BᵀB by a few units of roundoff; a
    # basis that is not orthonormal at all is off by O(1). The floor allows fp32 SVD/QR output.
    return max(1e-4, 16 * torch.finfo(dtype).eps)


def check_basis(name: str, B, dim: int, dim_name: str) -> None:
    """``B`` must be an orthonormal ``dim×k`` basis (``k`` may be 0)."""
    check_tensor(name, B, ndim=2)
    if B.shape[0] != dim:
        raise ValueError(f"{name} must have {dim} rows ({dim_name}), got shape {tuple(B.shape)}")
    k = B.shape[1]
    if k > dim:
        raise ValueError(f"{name} has {k} columns, more than its {dim} rows: it cannot be orthonormal")
    if not _check_orthonormal or k == 0:
        return
    work = torch.float64 if B.dtype == torch.float64 else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(k, 4, generator=gen, dtype=work).to(B.device)
    probe = probe / probe.norm(dim=0, keepdim=True)
    Bw = B.to(work)
    err = (Bw.T @ (Bw @ probe) - probe).norm(dim=0).max().item()
    tol = _orthonormality_tolerance(B.dtype)
    if not err <= tol:  # also catches NaN
        check_finite(name, B)  # the clearer message for a basis holding NaN or Inf
        raise ValueError(f"{name} must have orthonormal columns: |{name}ᵀ{name}z − z| = {err:.3g} "
                         f"for a unit probe z, tolerance {tol:.1g} for {B.dtype} "
                         "(set_orthonormality_check(False) skips this check)")
