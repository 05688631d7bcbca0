"""FusedKeepLoRALinear: a drop-in ``nn.Linear`` replacement with a residual-subspace LoRA branch.

``y = x Wᵀ + b + c · (x Aᵀ) Bᵀ`` with ``W`` ``out×in`` (frozen, shared with the replaced linear),
``A`` ``r×in`` (frozen unless ``train_A``), ``B`` ``out×r`` (trainable, zero at a task start) and
``c = (alpha / r) · layer_scale``. ``ΔW = c·B A`` is never formed. The backward pass projects
``dB`` onto ``(I − UUᵀ)`` and ``dA`` onto ``(I − VVᵀ)``; :meth:`FusedKeepLoRALinear.project_` restores
both constraints exactly after an optimizer step (Adam's element-wise scaling leaves them).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_basis, check_finite, check_tensor
from .. import ops  # noqa: F401  (registers torch.ops.kplora.*)
from ..distributed import add_, assign_, full  # noqa: F401  (re-exported: nn.linear.full etc.)
from .function import _KeepLoRAFunction, low_rank_delta  # noqa: F401  (re-exported: nn.linear.low_rank_delta)
from .hooks import GradientAccumulator, InputAccumulator
from .state import _BASES, LayerState


def _basis_value(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or isinstance(value, nn.Parameter):
        raise TypeError(f"{name} must be a tensor (not an nn.Parameter: a basis is not trained), "
                        f"got {type(value).__name__}")
    return value.detach() if value.requires_grad else value  # the object itself: placements compare identity


class _Basis:
    """A basis attribute (``V``, ``U``): a plain tensor attribute of the layer, not a buffer (see the
    layer's docstring), stored under ``_basis_<name>`` and checked by :func:`_basis_value`."""

    def __init__(self, doc: str):
        self.__doc__ = doc

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        return self if obj is None else obj.__dict__["_basis_" + self.name]

    def __set__(self, obj, value) -> None:
        obj.__dict__["_basis_" + self.name] = _basis_value(self.name, value)


class _Slot:
    """An attribute that holds None or an instance of ``protocol`` (a runtime-checkable protocol);
    anything else raises ``TypeError`` naming the attribute, what it must have and what it got."""

    def __init__(self, protocol, expected: str, doc: str):
        self.protocol, self.expected, self.__doc__ = protocol, expected, doc

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        return self if obj is None else obj.__dict__.get("_" + self.name)

    def __set__(self, obj, value) -> None:
        if value is not None and not isinstance(value, self.protocol):
            raise TypeError(f"{self.name} must have {self.expected} or be None, got {type(value).__name__}")
        obj.__dict__["_" + self.name] = value


class FusedKeepLoRALinear(LayerState):
    """A LoRA linear whose updates stay in the residual subspace of its protected bases.

    Parameters: ``weight`` (``out×in``) and ``bias`` (shared with the replaced linear, frozen),
    ``lora_A`` (``r×in``), ``lora_B`` (``out×r``, zero). Protected bases: ``V`` (``in×k_in``) and
    ``U`` (``out×k_out``), empty until :meth:`set_bases`. Inputs: ``(..., in)``, any float dtype.

    The bases are part of the layer's ``state_dict`` (keys ``V`` and ``U``) but are not module
    buffers: ``DistributedDataParallel`` does not broadcast them and FSDP2's ``fully_shard`` does not
    move them (they are not model state to the engines, see :mod:`kplora_kernels.distributed`). A
    ``Module.to``/``cuda``/``half`` moves a basis that lives with the weight to the weight's new
    device and never changes its dtype (a cast of the bases to half precision would break their
    orthonormality); a basis kept elsewhere (a placement's host copy) stays where it is.
    """

    V = _Basis("The protected input basis, ``in×k_in`` (its complement ``in×(in−k_in)`` when ``V_complement``).")
    U = _Basis("The protected output basis, ``out×k_out`` (``out×0`` when the output side is unprotected).")

    def _apply(self, fn, recurse: bool = True):
        home = self.weight.device
        bases = {key: getattr(self, key) for key in _BASES}
        result = super()._apply(fn, recurse)
        for key, t in bases.items():
            if t.device != home:
                continue  # kept off the weight's device by a placement: it stays there
            # where fn sends a tensor of the basis' dtype, without converting the values
            target = fn(torch.empty(0, dtype=t.dtype, device=t.device)).device
            if target != t.device:
                setattr(self, key, t.to(target))
        return result

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float = 1.0,
                 layer_scale: float = 1.0, bias: bool = True, *, dropout: float = 0.0,
                 train_A: bool = False, device=None, dtype=None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_from(base, rank, alpha, layer_scale, dropout, train_A)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float = 1.0, layer_scale: float = 1.0, *,
                    dropout: float = 0.0, train_A: bool = False) -> "FusedKeepLoRALinear":
        """Wrap ``linear``: its weight and bias are shared (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._init_from(linear, rank, alpha, layer_scale, dropout, train_A)
        module.train(linear.training)  # in an eval model the adapter's dropout stays off
        return module

    def _init_from(self, linear, rank, alpha, layer_scale, dropout, train_A):
        out_features, in_features = linear.weight.shape
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"rank must be an int in [1, min(in, out) = {min(in_features, out_features)}], "
                            f"got {type(rank).__name__} {rank!r}")
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be an int in [1, min(in, out) = {min(in_features, out_features)}], "
                             f"got {rank!r}")
        for name, value in (("alpha", alpha), ("layer_scale", layer_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a finite number (int or float), got {type(value).__name__} {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout must be a float in [0, 1), got {type(dropout).__name__} {dropout!r}")
        if not 0.0 <= dropout < 1.0:  # also refuses NaN
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(train_A, bool):
            raise TypeError(f"train_A must be a bool, got {type(train_A).__name__} {train_A!r}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha, self.layer_scale = float(alpha), float(layer_scale)
        self.weight = linear.weight
        self.bias = linear.bias
        self._base_class = type(linear)  # restored by to_linear()
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        A0 = torch.linalg.qr(torch.randn(in_features, rank, device=self.weight.device))[0].mT
        self.lora_A = nn.Parameter(A0.to(self.weight.dtype).contiguous(), requires_grad=train_A)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.V = torch.zeros(in_features, 0, **factory)
        self.U = torch.zeros(out_features, 0, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.V_complement = False  # V holds the complement of the protected basis (cheaper past in/2)
        self.grad_accumulator: GradientAccumulator | None = None
        self.input_accumulator: InputAccumulator | None = None

    grad_accumulator = _Slot(GradientAccumulator, "an update(dY, X) method (GradientAccumulator)",
                             "Receives ``(dY, X)`` of every backward pass (see :class:`GradientAccumulator`), or None.")
    input_accumulator = _Slot(InputAccumulator, "an update(X) method (InputAccumulator)",
                              "Receives ``X`` of every forward pass (see :class:`InputAccumulator`), or None.")

    @property
    def scaling(self) -> float:
        """``c = (alpha / r) · layer_scale``, the factor on the adapter branch."""
        return self.alpha / self.rank * self.layer_scale

    @property
    def protects_input(self) -> bool:
        return self.V_complement or self.V.shape[1] > 0

    @property
    def k_in(self) -> int:
        """The dimension of the protected input subspace (whichever way ``V`` stores it)."""
        return self.in_features - self.V.shape[1] if self.V_complement else self.V.shape[1]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scaling={self.scaling:.4g}, k_in={self.k_in}{' (complement stored)' if self.V_complement else ''}, "
                f"k_out={self.U.shape[1]}, merged={self.merged}")

    def project_input_side(self, A: torch.Tensor, V: torch.Tensor | None = None) -> torch.Tensor:
        """``A (I − V Vᵀ)`` for rows ``A`` (``…×in``), whichever way ``V`` is stored; ``V``: the layer's
        basis already in ``A``'s dtype and device, when the caller holds it so (no conversion per call)."""
        if not self.protects_input:
            return A
        V = self.V.to(A.dtype) if V is None else V
        # float64 bookkeeping (set_bases' orthonormalisation) runs on the torch backend whatever
        # KPLORA_BACKEND forces (the Triton kernels take no float64)
        backend = "torch" if A.dtype == torch.float64 else None
        return torch.ops.kplora.row_projection(A, V, 1.0, self.V_complement, backend)

    # --- bases and the task lifecycle -----------------------------------------------------------
    def set_bases(self, V: torch.Tensor | None = None, U: torch.Tensor | None = None, *,
                  V_complement: bool = False, copy: bool = True) -> None:
        """Set the protected bases: ``V`` ``in×k_in`` and/or ``U`` ``out×k_out``, orthonormal columns.
        With ``V_complement=True``, ``V`` spans the *residual* input space instead (``in×(in−k_in)``,
        the cheaper form once ``k_in > in/2``). A side given as None keeps its current basis. The
        adapter is projected to satisfy the new constraints: ``A``'s rows are re-orthonormalised in
        the residual input space, ``B ← (I−UUᵀ)B``. The layer keeps a copy of each basis on its
        weight's device; ``copy=False`` keeps the given tensor itself where it is already there and
        contiguous (no second copy of a large basis; the caller must not change it afterwards)."""
        if not isinstance(V_complement, bool):
            raise TypeError(f"V_complement must be a bool, got {type(V_complement).__name__} {V_complement!r}")
        given = [(name, B, dim, what) for name, B, dim, what in (("V", V, self.in_features, "in_features"),
                                                                  ("U", U, self.out_features, "out_features"))
                 if B is not None]
        for name, B, dim, what in given:  # check both before changing either
            check_basis(name, B, dim, what)
            if name == "V":
                room = B.shape[1] if V_complement else dim - B.shape[1]
                if room < self.rank:
                    raise ValueError(f"V leaves a residual space of {room} dimensions, fewer than "
                                     f"rank = {self.rank}: the adapter would have no room")
        for name, B, _, _ in given:
            if name == "V":
                self.V_complement = V_complement
            B = B.detach().to(self.weight.device)
            setattr(self, name, B.clone() if copy else B.contiguous())
        with torch.no_grad():
            if self.protects_input:
                A = self._orthonormal_residual_rows(full(self.lora_A).double())
                self._check_A_against_V(A.to(self.lora_A.dtype))
                assign_(self.lora_A, A)
            if self.U.shape[1]:
                B = full(self.lora_B)
                assign_(self.lora_B, torch.ops.kplora.residual_projection(B, self.U.to(B.dtype), None, 1.0, False,
                                                                          False, None))

    def _orthonormal_residual_rows(self, A: torch.Tensor) -> torch.Tensor:
        """Orthonormal rows spanning as much of ``A (I − VVᵀ)`` as survives the projection (fp64).

        Row ``j`` becomes the part of ``a_j`` orthogonal to span(V) and to rows ``< j`` (Gram–Schmidt
        order, signs kept), so a row already orthogonal to both is unchanged. A row whose residual part
        is lost (``a_j`` inside span(V) + span(a_<j), to rounding) is replaced by a residual direction
        drawn from a fixed seed (the same on every rank), so ``A`` never reaches into span(V) (the
        QR of a rank-deficient matrix alone would return arbitrary directions there)."""
        r, n = A.shape
        norms = A.norm(dim=1).clamp_min(torch.finfo(A.dtype).tiny)
        gen = torch.Generator(device="cpu").manual_seed(0)
        signed = lambda Q, R: Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)  # noqa: E731
        V = self.V.to(A.dtype)  # converted once for the projections below

        def residual(X):
            # With V orthonormal to δ (fp32: 1e-7, bf16: 1e-2), one projection leaves δ·|X V| inside
            # span(V); each further one multiplies that by δ. Three reach fp32 rounding even for bf16.
            for _ in range(3):
                X = self.project_input_side(X, V)
            return X

        rows = self.project_input_side(A, V)
        for _ in range(4):
            Q, R = torch.linalg.qr(rows.mT)  # n×r; |R_jj| = distance of row j from V and the rows before
            lost = torch.diagonal(R).abs() <= 1e-6 * norms
            if not lost.any():
                # projecting again removes what rounding (and a basis orthonormal only to its own
                # precision) left inside span(V); a direction that was only rounding shrinks under it
                P = residual(signed(Q, R).mT)
                lost = P.norm(dim=1) < 0.5
                if not lost.any():
                    Q2, R2 = torch.linalg.qr(P.mT)
                    return signed(Q2, R2).mT.contiguous()
            # replace the lost rows by directions orthogonal to span(V) and to the kept rows, which
            # the next QR then leaves as they are
            kept = torch.linalg.qr(rows[~lost].mT)[0]  # n×(r − lost)
            fill = torch.randn(int(lost.sum()), n, generator=gen, dtype=A.dtype).to(A.device)
            for _ in range(2):
                fill = residual(fill)
                fill = fill - (fill @ kept) @ kept.mT
            rows = rows.clone()
            rows[lost] = fill
            norms = norms.clone()
            norms[lost] = fill.norm(dim=1)
        raise RuntimeError("could not find rank residual directions for lora_A (this should not happen: "
                           "set_bases checks that the residual space has room for them)")

    def _check_A_against_V(self, A: torch.Tensor) -> None:
        """Each row of ``A`` must lie (to its dtype's rounding) outside span(V)."""
        if not self.protects_input:
            return
        A = full(A.detach())
        work = torch.float64 if A.dtype == torch.float64 else torch.float32
        Aw = A.to(work)
        inside = Aw - self.project_input_side(Aw)
        leak = (inside.norm(dim=1) / Aw.norm(dim=1).clamp_min(torch.finfo(work).tiny)).max().item()
        tol = max(1e-4, 16 * torch.finfo(A.dtype).eps)
        if not leak <= tol:
            raise ValueError(f"lora_A has components in span(V): max over rows of |a V| / |a| = {leak:.3g} "
                             f"(tolerance {tol:.1g} for {A.dtype}); its rows must be orthogonal to the "
                             "protected basis V")

    def reset_adapter(self, A: torch.Tensor) -> None:
        """Start a task: ``lora_A ← A`` (``r×in``, rows orthogonal to ``V``), ``lora_B ← 0``. After
        :meth:`merge_` (a task end) this makes the merge permanent: the adapter starts afresh."""
        check_tensor("A", A, ndim=2)
        if tuple(A.shape) != (self.rank, self.in_features):
            raise ValueError(f"A must have shape ({self.rank}, {self.in_features}) (rank×in_features), "
                             f"got {tuple(A.shape)}")
        check_finite("A", A)
        self._check_A_against_V(A)
        with torch.no_grad():
            assign_(self.lora_A, A)
            self.lora_B.zero_()
        self.merged = False

    @torch.no_grad()
    def project_(self) -> None:
        """Restore the constraints after an optimizer step: ``B ← (I−UUᵀ)B``, ``A ← A(I−VVᵀ)``."""
        if self.U.shape[1]:
            B = full(self.lora_B)
            assign_(self.lora_B, torch.ops.kplora.residual_projection(B, self.U.to(B.dtype), None, 1.0, False, False,
                                                                      None))
        if self.lora_A.requires_grad and self.protects_input:
            assign_(self.lora_A, self.project_input_side(full(self.lora_A)))

    def register_projection_hook(self, optimizer: torch.optim.Optimizer):
        """Run :meth:`project_` after every ``optimizer.step()``; returns the removable handle."""
        _check_optimizer(optimizer)
        return optimizer.register_step_post_hook(lambda *_: self.project_())

    def delta_weight(self) -> torch.Tensor:
        """``c · B A`` (``out×in``) in fp32 (fp64 for fp64 weights)."""
        return low_rank_delta(full(self.lora_B.detach()), full(self.lora_A.detach()), self.scaling, self.weight.dtype)

    @torch.no_grad()
    def merge_(self) -> None:
        """Fold ``c·B A`` into the (shared) weight; the forward then skips the adapter branch."""
        if self.merged:
            raise RuntimeError("the adapter is already merged")
        add_(self.weight, self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge_(self) -> None:
        """Subtract ``c·B A`` from the weight again (equal to the weight before :meth:`merge_` to within
        rounding in the weight's dtype)."""
        if not self.merged:
            raise RuntimeError("the adapter is not merged")
        add_(self.weight, self.delta_weight().neg_())
        self.merged = False

    @torch.no_grad()
    def absorb_(self) -> None:
        """The task-end step: fold ``c·B A`` into the weight for good and zero ``B`` (``A`` stays)."""
        self.merge_()
        self.lora_B.zero_()
        self.merged = False

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input must have shape (..., {self.in_features}), got {tuple(x.shape)}")
        if x.device != self.weight.device:
            raise ValueError(f"input is on {x.device} but the layer's weight is on {self.weight.device}; "
                             "move one to the other")
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"input has dtype {x.dtype} but the layer's weight has dtype {self.weight.dtype}: "
                            f"cast one to the other (x.to({self.weight.dtype}) or layer.to({x.dtype})), "
                            "or run under torch.autocast")
        if self.input_accumulator is not None:
            self.input_accumulator.update(x.detach().reshape(-1, self.in_features))
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        x_d = self.dropout(x) if self.training and isinstance(self.dropout, nn.Dropout) else None
        return _KeepLoRAFunction.apply(x, x_d, self.weight, self.bias, self.lora_A, self.lora_B,
                                       self.U if self.U.shape[1] else None,
                                       self.V if self.protects_input else None, self.V_complement,
                                       self.scaling, self.grad_accumulator)

    # --- unloading --------------------------------------------------------------------------------
    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """The plain linear this layer wraps, with the adapter folded in: its weight becomes
        ``W + c·B A`` (in place, unless already merged or ``B = 0``) and is shared, not copied, as is the
        bias. The class of the wrapped linear is restored (e.g. an ``nn.Linear`` subclass); its
        parameters stay frozen. This layer is left merged."""
        if not self.merged and bool(full(self.lora_B.detach()).any()):
            self.merge_()
        cls = getattr(self, "_base_class", nn.Linear)
        linear = cls.__new__(cls)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight = self.weight
        linear.register_parameter("bias", self.bias)
        linear.train(self.training)
        return linear

def _check_optimizer(optimizer) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (its step post-hook re-projects the adapters), "
                        f"got {type(optimizer).__name__}")


def register_projection_hooks(model: nn.Module, optimizer: torch.optim.Optimizer):
    """One optimizer post-step hook that runs :meth:`FusedKeepLoRALinear.project_` on every such
    layer of ``model``; returns the removable handle."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_optimizer(optimizer)
    layers = [m for m in model.modules() if isinstance(m, FusedKeepLoRALinear)]

    def hook(*_):
        for layer in layers:
            layer.project_()
    return optimizer.register_step_post_hook(hook)
