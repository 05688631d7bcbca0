"""The autograd function of :class:`~kplora_kernels.nn.linear.FusedKeepLoRALinear` and the merge
arithmetic it shares with the controller.

Orientation as in the layer: ``x`` is ``(..., in)``, ``W`` ``out×in``, ``A`` ``r×in``, ``B``
``out×r``, bases ``V`` ``in×k_in`` and ``U`` ``out×k_out``; ``c`` is the branch's scalar factor.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops  # noqa: F401  (registers torch.ops.kplora.*)


def low_rank_delta(B: torch.Tensor, A: torch.Tensor, scaling: float, weight_dtype: torch.dtype) -> torch.Tensor:
    """``c · B A`` (``B`` ``out×r``, ``A`` ``r×in``) in fp32, fp64 for fp64 weights: the arithmetic of
    every merge (:meth:`FusedKeepLoRALinear.merge_` and the replay of a compact checkpoint), which
    keeps a replay bit-identical to the merges it repeats."""
    work = torch.float64 if weight_dtype == torch.float64 else torch.float32
    return (B.to(work) @ A.to(work)).mul_(scaling)


class _KeepLoRAFunction(torch.autograd.Function):
    """Forward and backward of the layer. ``x_d`` is the input after the adapter's dropout, or None
    without dropout. Saves ``h = x_d Aᵀ`` (``tokens×r``) and the input only when a gradient or the
    gradient accumulator needs it."""

    @staticmethod
    def forward(ctx, x, x_d, W, b, A, B, U, V, V_complement, c, grad_accumulator):
        h = nn.functional.linear(x if x_d is None else x_d, A)
        y = nn.functional.linear(x, W, b)
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), B.to(y.dtype).mT, alpha=c)  # no extra pass
        keep_x = W.requires_grad or grad_accumulator is not None or (x_d is None and A.requires_grad)
        keep_x_d = x_d is not None and A.requires_grad
        ctx.save_for_backward(h, x if keep_x else None, x_d if keep_x_d else None, W, A, B, U, V)
        ctx.c, ctx.grad_accumulator, ctx.has_dropout = c, grad_accumulator, x_d is not None
        ctx.V_complement = V_complement
        return y

    @staticmethod
    def backward(ctx, dY):
        h, x, x_d, W, A, B, U, V = ctx.saved_tensors
        c, dt = ctx.c, dY.dtype
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731  (..., n) → tokens×n
        dY2 = flat(dY)
        dYB = dY2 @ B.to(dt)  # tokens×r
        dx = dx_d = dW = db = dA = dB = None
        if ctx.needs_input_grad[0]:
            dx = dY2 @ W.to(dt)
            if not ctx.has_dropout:
                dx.addmm_(dYB, A.to(dt), alpha=c)
            dx = dx.view(*dY.shape[:-1], W.shape[1])
        if ctx.has_dropout and ctx.needs_input_grad[1]:
            dx_d = (c * dYB @ A.to(dt)).view(*dY.shape[:-1], A.shape[1])
        if ctx.needs_input_grad[2]:
            dW = dY2.mT @ flat(x).to(dt)
        if ctx.needs_input_grad[3]:
            db = dY2.sum(0)
        # the bases were validated by set_bases: the registered projection ops run without re-checking.
        # The products run in the gradient's dtype (bf16 under autocast); the projection runs in the
        # bases' dtype (fp32 by default), so the gradient the optimizer sees (in the factor's dtype) has
        # nothing left inside span(U)/span(V) beyond that dtype's rounding.
        if ctx.needs_input_grad[5]:
            dB = dY2.mT @ flat(h).to(dt)  # out×r
            if U is None:
                dB = c * dB
            else:
                pt = torch.promote_types(dB.dtype, U.dtype)
                dB = torch.ops.kplora.residual_projection(dB.to(pt), U.to(pt), None, c, False, False, None)
            dB = dB.to(B.dtype)
        if ctx.needs_input_grad[4]:
            dA = dYB.mT @ flat(x if x_d is None else x_d).to(dt)  # r×in
            if V is None:
                dA = c * dA
            else:
                pt = torch.promote_types(dA.dtype, V.dtype)
                dA = torch.ops.kplora.row_projection(dA.to(pt), V.to(pt), c, ctx.V_complement, None)
            dA = dA.to(A.dtype)
        if ctx.grad_accumulator is not None:
            ctx.grad_accumulator.update(dY2.detach(), flat(x).detach())
        return dx, dx_d, dW, db, dA, dB, None, None, None, None, None
