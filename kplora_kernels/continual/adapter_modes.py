"""How the engine trains a target weight: a LoRA adapter merged at each task end (``adapter="lora"``)
or the whole weight with every update confined to the residual subspace (``adapter="full"``).

Full mode (docs/design.md §1 applied to the weight itself): at a task start the target weights become
trainable and their start value ``W₀`` is recorded through thin products; before each optimizer step
every target gradient is replaced in place by ``s_l·(I−UUᵀ)G(I−VVᵀ)``; after each step the constraint
``(W − W₀)V = 0``, ``Uᵀ(W − W₀) = 0`` is restored exactly (Adam's element-wise scaling leaves it
otherwise). The task end grows ``V`` by the GPM rule as in LoRA mode. The grouped projection and
the restore are the ops :func:`~kplora_kernels.ops.residual_project_grouped_` and
:func:`~kplora_kernels.ops.subspace_restore_grouped_`.

The gradient projection runs in the optimizer's pre-step hook, once per step, not after each
backward: with gradient accumulation, projecting after every backward would apply ``s_l`` once per
micro-batch to the earlier ones. Code that reads the gradients before the step (gradient clipping)
calls :meth:`KeepLoRA.project_gradients_` first; the hook then skips that step's projection.

A mode sees the engine only through an :class:`~.context.EngineContext` (and, where it asks, the
method).
"""
from __future__ import annotations

import torch

from ..distributed import project_sharded_, restore_sharded_, row_shard, sharded_snapshot
from ..nn import register_projection_hooks
from ..ops import SubspaceAnchor, residual_project_grouped_, subspace_anchor, subspace_restore_grouped_
from .context import EngineContext


class _Handles:
    """Several hook handles removed together (the optimizer's pre- and post-step hooks)."""

    def __init__(self, *handles):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class LoRAAdapter:
    """``A``/``B`` per layer, set by the method at each task start and merged at each task end.

    What trains is fixed at wrap time by the method (``B`` always, ``A`` when ``trains_A``), so that
    DDP's reducer, FSDP2, the Trainer and any optimizer built right after wrapping see every
    parameter any task trains; nothing switches ``requires_grad`` in mid-run."""

    name = "lora"

    def wrap(self, layer, method) -> None:
        """Fix what trains in ``layer`` for the whole run: ``B``, and ``A`` when ``method.trains_A``."""
        layer.lora_A.requires_grad_(method.trains_A)
        layer.lora_B.requires_grad_(True)

    def trainable(self, ctx: EngineContext) -> list:
        return [p for layer in ctx.layers.values() for p in (layer.lora_A, layer.lora_B) if p.requires_grad]

    def begin_task(self, ctx: EngineContext, method, loader, loss_fn, fraction: float) -> None:
        method.init_adapters(ctx, loader, loss_fn, fraction)

    def end_task(self, ctx: EngineContext) -> None:
        for layer in ctx.layers.values():
            layer.absorb_()  # B = 0 afterwards: absorbing twice (a retried end_task) adds nothing

    def register_hooks(self, ctx: EngineContext, optimizer):
        return register_projection_hooks(ctx.model, optimizer)

    def state_tensors(self, ctx: EngineContext) -> dict:
        return {}

    def load_state_tensors(self, ctx: EngineContext, tensors: dict, task_open: bool) -> None:
        pass


class FullAdapter:
    """Residual-subspace full fine-tuning. Extra memory per layer while a task is open: the thin
    products ``W₀V`` (``out×k_in``) and ``UᵀW₀`` (``k_out×in``) while ``V`` is stored as itself; once
    ``V`` is stored as its complement (``k_in > in/2``) thin products no longer determine ``W − W₀`` and
    a copy of ``W₀`` (``out×in``) is kept instead. Plain data parallel (DDP) works (the gradients are
    already summed when the pre-step hook runs). FSDP2 (row shards, ``Shard(0)``): the ``V`` side is
    row-local; the ``U`` side sums ``UᵀG`` (``k_out×in``) over the shard group, one all-reduce per
    weight per step for the gradient and one for the restore; each rank keeps its rows of ``W₀V``
    (or of ``W₀``) and the whole ``UᵀW₀``. Checkpoints saved mid-task under FSDP2 hold each rank's
    reference rows only on that rank and are refused (save between tasks)."""

    name = "full"

    def __init__(self):
        self.start: dict[str, dict[str, torch.Tensor]] = {}  # name → snapshot of W₀ (thin or whole)
        # the gradients now in .grad were already projected; any forward with gradients enabled (a new
        # step's backward follows) clears it, so a step the loop skipped (GradScaler on overflow runs
        # no optimizer.step, hence no post-step hook) never leaves the next one unprojected
        self._projected = False

    def wrap(self, layer, method) -> None:
        """The target weight trains (from wrap on, whatever the method); its adapter never does."""
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)
        # trainable from wrap on (DDP, FSDP2 and the Trainer build their state from it); between
        # tasks the gradients are None and the optimizer steps nothing
        layer.weight.requires_grad_(True)
        layer.merged = True  # B = 0, nothing to fold: the forward is the plain linear of the weight
        layer.register_forward_pre_hook(self._new_step)

    def _new_step(self, module, args) -> None:
        if torch.is_grad_enabled():
            self._projected = False

    def trainable(self, ctx: EngineContext) -> list:
        return [layer.weight for layer in ctx.layers.values()]

    @staticmethod
    def _bases(layer):
        """``(U or None, V or None, V_complement)`` of ``layer`` as the ops take them."""
        U = layer.U if layer.U.shape[1] else None
        V = layer.V if layer.protects_input else None
        return U, V, layer.V_complement and V is not None

    @torch.no_grad()
    def _snapshot(self, layer) -> dict[str, torch.Tensor]:
        U, V, complement = self._bases(layer)
        W = layer.weight.detach()
        if U is None and V is None:
            return {}
        if complement:  # thin products of a complement basis are as large as W₀: keep W₀
            return {"W0": W.clone()}
        anchor = subspace_anchor(W, U, V)
        return {k: t for k, t in anchor._asdict().items() if t is not None}

    def begin_task(self, ctx: EngineContext, method, loader, loss_fn, fraction: float) -> None:
        for name, layer in ctx.layers.items():
            if hasattr(layer.weight, "device_mesh"):
                row_shard(layer.weight, name)  # raises for layouts other than FSDP2's Shard(0)
        self.start = {name: (sharded_snapshot(layer.weight.detach(), *self._bases(layer))
                            if hasattr(layer.weight, "device_mesh") else self._snapshot(layer))
                      for name, layer in ctx.layers.items()}
        self._projected = False

    @torch.no_grad()
    def project_gradients_(self, ctx: EngineContext) -> None:
        """``G ← s_l·(I−UUᵀ)G(I−VVᵀ)`` in place for every target weight's gradient, all in one grouped
        call (:func:`~kplora_kernels.ops.residual_project_grouped_`); once per optimizer step."""
        if self._projected:
            return
        Gs, Us, Vs, scales, complements = [], [], [], [], []
        for layer in ctx.layers.values():
            G = layer.weight.grad
            U, V, complement = self._bases(layer)
            if G is None or (U is None and V is None and layer.layer_scale == 1.0):
                continue
            if hasattr(G, "device_mesh"):
                project_sharded_(G, U, V, complement, layer.layer_scale)
                continue
            Gs.append(G)
            Us.append(U)
            Vs.append(V)
            scales.append(layer.layer_scale)
            complements.append(complement)
        if Gs:
            residual_project_grouped_(Gs, Us, Vs, scales, V_complement=complements)
        self._projected = True

    @torch.no_grad()
    def restore_(self, ctx: EngineContext) -> None:
        """``W ← W₀ + (I−UUᵀ)(W − W₀)(I−VVᵀ)`` for every target weight
        (:func:`~kplora_kernels.ops.subspace_restore_grouped_`): ``(W − W₀)V = 0`` and ``Uᵀ(W − W₀) = 0``
        again after an optimizer step (a rank-(k_in + k_out) correction from the thin anchor)."""
        self._projected = False
        Ws, Us, Vs, W0s, anchors, complements = [], [], [], [], [], []
        for name, layer in ctx.layers.items():
            snap = self.start[name]
            if not snap:
                continue
            U, V, complement = self._bases(layer)
            if hasattr(layer.weight, "device_mesh"):
                restore_sharded_(layer.weight.detach(), U, V, complement, snap)
                continue
            Ws.append(layer.weight.detach())
            Us.append(U)
            Vs.append(V)
            complements.append(complement)
            W0s.append(snap.get("W0"))
            anchors.append(None if "W0" in snap else SubspaceAnchor(snap.get("W0V"), snap.get("UtW0")))
        if Ws:
            subspace_restore_grouped_(Ws, Us, Vs, W0s=W0s, anchors=anchors, V_complement=complements)

    def end_task(self, ctx: EngineContext) -> None:
        for layer in ctx.layers.values():
            layer.weight.grad = None
        self.start = {}

    def register_hooks(self, ctx: EngineContext, optimizer):
        pre = optimizer.register_step_pre_hook(lambda *_: self.project_gradients_(ctx))
        post = optimizer.register_step_post_hook(lambda *_: self.restore_(ctx))
        return _Handles(pre, post)

    def state_tensors(self, ctx: EngineContext) -> dict:
        if self.start and any(hasattr(layer.weight, "device_mesh") for layer in ctx.layers.values()):
            raise NotImplementedError("saving an open task of adapter='full' with FSDP2-sharded weights is not "
                                      "implemented (each rank holds its own rows of the task-start reference); "
                                      "save after end_task")
        return {f"full_start.{name}.{key}": t for name, snap in self.start.items() for key, t in snap.items()}

    def load_state_tensors(self, ctx: EngineContext, tensors: dict, task_open: bool) -> None:
        self.start = {}
        if not task_open:
            return
        for name, layer in ctx.layers.items():
            prefix = f"full_start.{name}."
            self.start[name] = {k[len(prefix):]: t.to(layer.weight.device).clone() for k, t in tensors.items()
                                if k.startswith(prefix)}


def make_adapter(config):
    return FullAdapter() if config.adapter == "full" else LoRAAdapter()
