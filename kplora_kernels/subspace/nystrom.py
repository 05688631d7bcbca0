"""The Nyström approximation of a PSD matrix from a sketch ``Y = C Ω``, and the trace estimates the
input sketch's residual energy falls back on (XNysTrace, Nyström++). Pure torch, fp64."""
from __future__ import annotations

import math

import torch


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
