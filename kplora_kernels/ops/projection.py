"""The residual projection ops: ``scale·(I − UUᵀ) G (I − VVᵀ)`` and its row form, registered with
``torch.library`` as ``kplora::residual_projection`` (new tensor, differentiable in ``G``),
``kplora::residual_projection_out`` (into a separate ``out``), ``kplora::residual_projection_`` (in
place) and ``kplora::row_projection`` (rows ``X``, differentiable in ``X``).

Each public function validates once (:mod:`.validation`), then calls the registered op; the op's
implementation asks the dispatcher (:mod:`.dispatch`) for a backend and runs it (:mod:`.torch_backend`,
the C++ kernels ``torch.ops.kplora.residual_project*``, the Triton launchers). Being custom ops they
appear in profiles, trace into ``torch.compile`` graphs through their fake implementations (no graph
break) and pass ``torch.library.opcheck``. The projection is self-adjoint, so the gradient of
``P(G)`` is ``P(dY)``; the bases are constants (a basis that requires grad is refused).

Results never alias inputs: without ``out=`` a new contiguous tensor is returned, and an ``out=``
that shares memory with an input (other than ``out=G`` itself, the in-place form) is refused with a
``ValueError``.
"""
from __future__ import annotations

import torch

from . import torch_backend, validation
from .dispatch import basis_width, resolve_backend
from .validation import nonempty

_LIB = "kplora"


def _cpp_bases(U, V, U_complement, V_complement):
    return (None if U_complement else nonempty(U)), (None if V_complement else nonempty(V))


def _backend(G, U, V, backend, U_complement, V_complement) -> str:
    return resolve_backend(G, backend, U_complement=U_complement and U is not None,
                           V_complement=V_complement and V is not None, k_out=basis_width(U), k_in=basis_width(V))


def project_into_(out: torch.Tensor, G: torch.Tensor, U, V, scale: float, name: str,
                  U_complement: bool = False, V_complement: bool = False, GV0=None, UtG0=None, UtD=None) -> None:
    """Write ``scale·(I − UUᵀ)(G − G0)(I − VVᵀ)`` into ``out`` (may be ``G``) with backend ``name``;
    arguments were validated. ``G0`` as the offsets ``GV0 = G0 V``, ``UtG0 = Uᵀ G0`` (the restore,
    scale 1); ``UtD``: ``Uᵀ(G − G0)`` summed over row shards by the caller. Runs in the inputs' dtypes
    whatever autocast region it is called from (the ops fall through autocast's dispatch)."""
    if not G.numel():
        return
    if torch.is_autocast_enabled(G.device.type):
        with torch.autocast(G.device.type, enabled=False):
            return project_into_(out, G, U, V, scale, name, U_complement, V_complement, GV0=GV0, UtG0=UtG0, UtD=UtD)
    U_complement, V_complement = U_complement and U is not None, V_complement and V is not None  # no basis: no flag
    if name == "triton":
        from . import triton_kernels

        if UtD is not None:
            triton_kernels.project_group([(G, out, nonempty(U), nonempty(V), scale, False, False, GV0, UtG0, UtD)])
        else:
            triton_kernels.project(G, U, V, scale, out, U_complement=U_complement, V_complement=V_complement,
                                   GV0=GV0, UtG0=UtG0)
        return
    if name == "cpp" and GV0 is None and UtG0 is None and UtD is None:
        U_sub, V_sub = _cpp_bases(U, V, U_complement, V_complement)
        if validation.same_view(out, G):
            torch.ops.kplora.residual_project_(out, U_sub, V_sub, scale)
        else:
            torch.ops.kplora.residual_project_out(G, U_sub, V_sub, scale, out=out)
        return
    torch_backend.project_into_(out, G, U, V, scale, U_complement, V_complement, GV0=GV0, UtG0=UtG0, UtD=UtD)


# --- registered ops ------------------------------------------------------------------------------------

_ARGS = "Tensor? U, Tensor? V, float scale, bool U_complement, bool V_complement, str? backend"


@torch.library.custom_op(f"{_LIB}::residual_projection", mutates_args=(), schema=f"(Tensor G, {_ARGS}) -> Tensor")
def _residual_projection(G, U, V, scale, U_complement, V_complement, backend):
    out = torch.empty_like(G, memory_format=torch.contiguous_format)
    project_into_(out, G, U, V, scale, _backend(G, U, V, backend, U_complement, V_complement),
                  U_complement, V_complement)
    return out


@_residual_projection.register_fake
def _(G, U, V, scale, U_complement, V_complement, backend):
    return torch.empty_like(G, memory_format=torch.contiguous_format)


def _projection_setup(ctx, inputs, output):
    _, U, V, scale, uc, vc, backend = inputs
    ctx.save_for_backward(U, V)
    ctx.args = (scale, uc, vc, backend)


def _projection_backward(ctx, dY):
    U, V = ctx.saved_tensors
    scale, uc, vc, backend = ctx.args
    return _residual_projection(dY, U, V, scale, uc, vc, backend), None, None, None, None, None, None


_residual_projection.register_autograd(_projection_backward, setup_context=_projection_setup)


@torch.library.custom_op(f"{_LIB}::residual_projection_out", mutates_args=("out",),
                         schema=f"(Tensor G, {_ARGS}, Tensor(a!) out) -> ()")
def _residual_projection_out(G, U, V, scale, U_complement, V_complement, backend, out):
    project_into_(out, G, U, V, scale, _backend(G, U, V, backend, U_complement, V_complement),
                  U_complement, V_complement)


@_residual_projection_out.register_fake
def _(G, U, V, scale, U_complement, V_complement, backend, out):
    return None


@torch.library.custom_op(f"{_LIB}::residual_projection_", mutates_args=("G",),
                         schema=f"(Tensor(a!) G, {_ARGS}) -> ()")
def _residual_projection_(G, U, V, scale, U_complement, V_complement, backend):
    project_into_(G, G, U, V, scale, _backend(G, U, V, backend, U_complement, V_complement),
                  U_complement, V_complement)


@_residual_projection_.register_fake
def _(G, U, V, scale, U_complement, V_complement, backend):
    return None


@torch.library.custom_op(f"{_LIB}::row_projection", mutates_args=(),
                         schema="(Tensor X, Tensor V, float scale, bool V_complement, str? backend) -> Tensor")
def _row_projection(X, V, scale, V_complement, backend):
    name = resolve_backend(X, backend, V_complement=V_complement, k_out=0, k_in=V.shape[1])
    if name == "cpp" and X.numel():
        return torch.ops.kplora.project_rows(X, V, scale).contiguous()
    X2 = X.reshape(-1, X.shape[-1])
    out = torch.empty(X2.shape, dtype=X.dtype, device=X.device)
    project_into_(out, X2, None, V, scale, name, False, V_complement)
    return out.view(X.shape)


@_row_projection.register_fake
def _(X, V, scale, V_complement, backend):
    return torch.empty_like(X, memory_format=torch.contiguous_format)


def _rows_setup(ctx, inputs, output):
    _, V, scale, vc, backend = inputs
    ctx.save_for_backward(V)
    ctx.args = (scale, vc, backend)


def _rows_backward(ctx, dY):
    (V,) = ctx.saved_tensors
    scale, vc, backend = ctx.args
    return _row_projection(dY, V, scale, vc, backend), None, None, None, None


_row_projection.register_autograd(_rows_backward, setup_context=_rows_setup)


# --- public functions --------------------------------------------------------------------------------

def residual_project(G: torch.Tensor, U: torch.Tensor | None = None, V: torch.Tensor | None = None,
                     scale: float = 1.0, *, out: torch.Tensor | None = None, backend: str | None = None,
                     U_complement: bool = False, V_complement: bool = False) -> torch.Tensor:
    """``scale · (I − U Uᵀ) G (I − V Vᵀ)`` (the residual projection, docs/design.md §1).

    G: ``(..., out, in)``; U: ``out×k_out`` or None; V: ``in×k_in`` or None (``k = 0`` allowed);
    orthonormal columns. A basis flagged ``*_complement`` spans the kept space instead (stored when
    the protected one covers more than half of the space). Returns a new contiguous tensor, or
    ``out``: ``out=G`` projects in place without a second ``out×in`` buffer; any other ``out`` must
    not share memory with ``G``, ``U`` or ``V``. Differentiable in ``G`` (without ``out``); the bases
    are constants.

    Raises ``TypeError``/``ValueError`` naming the argument for bad input (also a basis that
    requires grad), and ``ValueError`` with the reasons when a forced ``backend`` cannot run (see
    :func:`kplora_kernels.ops.not_supported_reasons`).
    """
    scale = validation.residual_project_args(G, U, V, scale)
    validation.check_bool("U_complement", U_complement)
    validation.check_bool("V_complement", V_complement)
    validation.not_differentiable(U=U, V=V)
    if not torch.compiler.is_compiling():  # a forced backend that cannot run raises here, also for meta tensors
        _backend(G, U, V, backend, U_complement, V_complement)
    if out is None:
        return torch.ops.kplora.residual_projection(G, U, V, scale, U_complement, V_complement, backend)
    validation.check_out(out, G, {"G": G, "U": U, "V": V})
    if validation.same_view(out, G):
        torch.ops.kplora.residual_projection_(out, U, V, scale, U_complement, V_complement, backend)
    else:
        torch.ops.kplora.residual_projection_out(G, U, V, scale, U_complement, V_complement, backend, out)
    return out


def project_rows(X: torch.Tensor, V: torch.Tensor, scale: float = 1.0, *, backend: str | None = None,
                 V_complement: bool = False) -> torch.Tensor:
    """``scale · (X − (X V) Vᵀ)`` for ``X`` of shape ``(..., d)`` and ``V`` ``d×k`` (orthonormal
    columns; ``V_complement``: ``V`` spans the kept space, giving ``scale·(XV)Vᵀ``); a new contiguous
    tensor, differentiable in ``X``. Raises as :func:`residual_project` does."""
    scale = validation.project_rows_args(X, V, scale)
    validation.check_bool("V_complement", V_complement)
    validation.not_differentiable(V=V)
    if not torch.compiler.is_compiling():
        resolve_backend(X, backend, V_complement=V_complement, k_out=0, k_in=V.shape[1])
    return torch.ops.kplora.row_projection(X, V, scale, V_complement, backend)
