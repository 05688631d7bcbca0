"""Continual-learning methods as strategies driven by one engine (:class:`~.controller.KeepLoRA`).

A method says, for every adapted linear: whether the pre-trained weight's principal subspace is
protected and whether the layer gets the depth scale ``s_l`` (at wrap time), how ``A`` and ``B`` are
set at a task start and whether ``A`` trains, what extra loss it adds (:meth:`Method.regularization`),
what it records at a task end, and whether the protected input basis grows from the task's inputs.
The engine runs every method through the same ``begin_task`` → train → ``end_task`` lifecycle, the
same fused layer and the same checkpoints. How the weight itself is trained (a LoRA adapter merged
at each task end, or the whole weight with its gradient projected) is the engine's ``adapter``
strategy (:mod:`.adapter_modes`), orthogonal to the method. A method sees the engine only through
an :class:`~.context.EngineContext` (the layers, the config, the task index, the process group, the
placement, the task's batches, one input pass, the broadcast).

Methods (``KeepLoRAConfig.method``):

- ``keeplora++`` / ``keeplora`` (docs/design.md §1): ``V`` (and ``U`` with ``eps_w_out``) from the
  principal subspace of the pre-trained weight; ``A`` = top-r right singular vectors of the projected
  task gradient; only ``B`` trains; ``V`` grows by GPM at each task end. ``keeplora++`` adds the
  layer scale ``s_l``.
- ``lora``: plain sequential LoRA as peft's ``LoraLayer`` (Hu et al., 2021): ``A`` by
  ``kaiming_uniform_(a=√5)``, ``B = 0``, scaling ``alpha/r``, both factors trained, merged after each
  task. With the same seed, ``A`` is the one ``torch.manual_seed(seed)`` + ``peft.get_peft_model``
  draws (peft's order: ``A`` and ``B`` as ``nn.Linear``, then ``A`` again).
- ``lora-fa``: LoRA with a frozen random orthonormal ``A`` per task (LoRA-FA), only ``B`` trains.
- ``inflora``: Liang & Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning",
  CVPR 2024.
- ``olora``: Wang et al., "Orthogonal Subspace Learning for Language Model Continual Learning",
  Findings of EMNLP 2023.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from ..distributed import full
from ..subspace import GradientSketch
from .context import EngineContext
from .values import at_least, eps


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


class Method:
    """The base strategy: no protection, nothing recorded, no extra loss. Subclasses set the class
    attributes and override :meth:`init_adapters` (and the recording/loss hooks they need)."""

    name: ClassVar[str] = ""
    protects_pretrained: ClassVar[bool] = False  # V (and U) from W0's principal subspace at wrap
    layer_scaling: ClassVar[bool] = False  # s_l on the layers of layer_scaling_towers
    grows_input_basis: ClassVar[bool] = False  # V expanded by GPM from the task's inputs at its end
    trains_A: ClassVar[bool] = False
    supports_full: ClassVar[bool] = False  # accepts adapter="full" (checked by check_config)
    # the config fields only this method (and its subclasses) reads: name → what it is; another
    # method's config must leave them at their defaults
    options: ClassVar[dict[str, str]] = {}

    def __init__(self, config):
        self.config = config

    @classmethod
    def check_options(cls, config) -> None:
        """Check (and normalise in place) the values of :attr:`options` on ``config``; raises
        ``TypeError``/``ValueError`` naming the field. Runs for every method's options, whichever
        method the config chooses, so a bad value is named even where it would be refused as foreign."""

    # --- task start (adapter="lora" only) ------------------------------------------------------------
    def init_adapters(self, ctx: EngineContext, loader, loss_fn, fraction: float) -> None:
        """Set every layer's ``A`` (``r×in``) and ``B = 0`` for task ``ctx.task_index``."""
        raise NotImplementedError

    # --- training --------------------------------------------------------------------------------------
    def regularization(self, ctx: EngineContext) -> torch.Tensor:
        """The method's extra loss for the current task (a scalar tensor; 0 when it has none)."""
        device = next(iter(ctx.layers.values())).weight.device
        return torch.zeros((), device=device)

    # --- task end -----------------------------------------------------------------------------------
    def end_task(self, ctx: EngineContext) -> None:
        """Record what the method keeps of the finished task (after the adapters are merged)."""

    # --- checkpoints --------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], ctx: EngineContext) -> None:
        pass


def _peft_init(ctx: EngineContext) -> None:
    """peft's ``LoraLayer`` initialisation for every layer, drawn in peft's order from the task's seed."""
    gen = _generator(ctx.config.seed + ctx.task_index)
    for layer in ctx.layers.values():
        A = torch.empty(layer.rank, layer.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)  # nn.Linear(in, r) of update_layer
        nn.init.kaiming_uniform_(torch.empty(layer.out_features, layer.rank), a=math.sqrt(5), generator=gen)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)  # reset_lora_parameters
        layer.reset_adapter(ctx.broadcast(A.to(layer.weight.device)))


class KeepLoRAMethod(Method):
    """KeepLoRA (docs/design.md §1): residual-subspace LoRA with gradient-informed ``A``."""

    name = "keeplora"
    protects_pretrained = grows_input_basis = supports_full = True
    options = {"eps_w_out": "output-side protection"}

    @classmethod
    def check_options(cls, config):
        """``config.eps_w_out``: None (no output-side protection) or an energy threshold in (0, 1],
        stored as a float.

        Raises:
            TypeError: ``eps_w_out`` is not a number (bools and strings included).
            ValueError: ``eps_w_out`` is not finite or lies outside (0, 1].
        """
        if config.eps_w_out is not None:
            config.eps_w_out = eps("eps_w_out", config.eps_w_out)

    def init_adapters(self, ctx, loader, loss_fn, fraction):
        cfg, sketches = self.config, {}
        for name, layer in ctx.layers.items():
            sketches[name] = GradientSketch(layer.out_features, layer.in_features, layer.rank,
                                            U=layer.U if layer.U.shape[1] else None, V=layer.V,
                                            V_complement=layer.V_complement,
                                            memory_budget=cfg.sketch_memory_budget,
                                            seed=cfg.seed + ctx.task_index, device=layer.weight.device)
            layer.grad_accumulator = sketches[name]
        count = 0
        try:
            for batch in ctx.batches(loader, fraction, "task gradient"):
                loss_fn(ctx.model, batch).backward()
                count += 1
        finally:
            for layer in ctx.layers.values():
                layer.grad_accumulator = None
            for p in ctx.trainable():
                p.grad = None  # the estimation pass is not a training step
        if count == 0:
            raise ValueError("begin_task: the loader yielded no batch, so the task gradient is unknown "
                             "(pass a non-empty loader)")
        for name, layer in ctx.placement.stream(ctx.layers):  # its bases on the device, the next on the way
            sketch = sketches.pop(name)
            sketch.all_reduce(ctx.process_group)  # a no-op without torch.distributed
            A = sketch.adapter_init(U=layer.U if layer.U.shape[1] else None, V=layer.V)
            layer.reset_adapter(ctx.broadcast(A.to(layer.weight.device)))


class KeepLoRAPlusPlus(KeepLoRAMethod):
    """KeepLoRA++: KeepLoRA with the depth-dependent layer scale ``s_l`` (docs/design.md §1)."""

    name = "keeplora++"
    layer_scaling = True


class LoRA(Method):
    """Plain sequential LoRA, exactly peft's ``LoraLayer`` (both factors trained, peft's init, scaling
    ``alpha/r``), merged into the weight after every task. With ``adapter="full"``: plain sequential
    full fine-tuning (the unprotected baseline)."""

    name = "lora"
    trains_A = supports_full = True

    def init_adapters(self, ctx, loader, loss_fn, fraction):
        _peft_init(ctx)


class LoRAFA(Method):
    """LoRA-FA: a frozen random orthonormal ``A`` per task (seeded), only ``B`` trains from zero."""

    name = "lora-fa"

    def init_adapters(self, ctx, loader, loss_fn, fraction):
        gen = _generator(self.config.seed + ctx.task_index)
        for layer in ctx.layers.values():
            A = torch.linalg.qr(torch.randn(layer.in_features, layer.rank, generator=gen))[0].mT
            layer.reset_adapter(ctx.broadcast(A.contiguous().to(layer.weight.device)))


def residual_directions(layer, vectors: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` orthonormal rows (``count×in``, fp64) in the residual input space of ``layer``
    (``⟂ span(V)``): the leading columns of ``vectors`` (``in×m``) projected off ``V``, filled with
    seeded random residual directions where they run out, re-projected and re-orthonormalised."""
    vecs = layer.project_input_side(vectors.double().mT).mT  # in×m in the residual space
    keep = vecs.norm(dim=0) > 1e-6 * max(1.0, vecs.norm(dim=0).max().item()) if vecs.numel() else vecs.new_zeros(0, dtype=torch.bool)
    vecs = vecs[:, keep][:, :count]
    if vecs.shape[1] < count:
        rand = torch.randn(layer.in_features, count - vecs.shape[1], generator=_generator(seed), dtype=torch.float64)
        vecs = torch.cat([vecs, rand.to(vecs.device)], dim=1)
    for _ in range(2):  # project and orthonormalise twice: one pass leaves rounding-size leaks
        vecs = torch.linalg.qr(layer.project_input_side(vecs.mT).mT)[0]
    return vecs.mT.contiguous()


class InfLoRA(Method):
    """InfLoRA (Liang & Li, CVPR 2024), with the down-projection ``A`` (their ``B_t``) fixed at the
    task start and only the up-projection ``B`` (their ``A_t``) trained from zero.

    Task start: ``A``'s rows are the top-r eigenvectors of ``Ĥ_t Ĥ_tᵀ`` with
    ``Ĥ_t = (I − M_t M_tᵀ) H_t`` (the paper's design of the dimensionality-reduction matrix), ``H_t``
    the new task's inputs to the layer
    (collected by a gradient-free pass of ``loss_fn`` over the ``begin_task`` loader) and ``M_t`` the
    protected input subspace (here ``V``, empty at the start: no principal subspace of the pre-trained
    weight). As in the authors' code, ``A`` is scaled by ``1/√3``; their code takes the left singular
    vectors of the one-sided ``(I − MMᵀ) H Hᵀ``, which span the same residual range, whereas this
    decomposes the symmetric ``(I − MMᵀ) H Hᵀ (I − MMᵀ)`` as the paper writes it. Task end: the adapters are merged
    and ``V`` grows from the task's inputs to the merged model by the GPM rule with threshold
    ``eps_f``; InfLoRA uses DualGPM, which stores the complement once the protected subspace is the
    larger one (the engine does the same) but chooses the added directions by a threshold on the
    complement's energy in that regime. This deviation is documented, not hidden: the thresholds
    agree while ``k_in < in/2``. (The paper's text was not available to this implementation; its
    description in the issue was cross-checked with the authors' released code.)
    """

    name = "inflora"
    grows_input_basis = True
    SCALE = 1 / math.sqrt(3)

    def init_adapters(self, ctx, loader, loss_fn, fraction):
        sketches = ctx.collect_inputs(loader, loss_fn, fraction, "task inputs")
        for name, layer in ctx.placement.stream(ctx.layers):  # its bases on the device, the next on the way
            sketch = sketches.pop(name)
            V = layer.V if (layer.V.shape[1] or layer.V_complement) else None
            # a few more than r: residual_directions drops any that rounding left inside span(V)
            vecs = sketch.top_residual_directions(2 * layer.rank, V, layer.V_complement)
            A = residual_directions(layer, vecs, layer.rank, self.config.seed + ctx.task_index)
            layer.reset_adapter(ctx.broadcast((self.SCALE * A).to(layer.weight.dtype)))


def olora_penalty(previous: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, lambda1: float,
                  lambda2: float) -> torch.Tensor:
    """O-LoRA's regulariser for one layer: ``λ₁ Σ_{i<t} ‖A_i A_tᵀ‖_F² + λ₂ (‖A_t‖_F² + ‖B_t‖_F²)``.

    ``previous``: the earlier tasks' down-projections stacked (``(t·r)×in``; ``Σ_i ‖A_i A_tᵀ‖_F²`` is
    ``‖A_prev A_tᵀ‖_F²``), or None; ``A`` ``r×in``, ``B`` ``out×r`` the current task's factors. This is
    the paper's orthogonality loss ``L_orth = Σ_{i<t} Σ_{j,k} O_{i,t}[j,k]²`` with ``O_{i,t}`` the
    products of the two tasks' down-projections, plus the ``λ₂`` weight regulariser (squared norms).
    Deviation noted, not adopted: the authors' released training loop sums ``|A_i A_tᵀ|`` (absolute
    values, not squared) and adds ``‖θ‖₂`` unsquared. (The paper's text was not available to check
    equation numbers; the formula is the one the issue states, cross-checked with the authors' code.)
    """
    loss = A.new_zeros(())
    if lambda1 and previous is not None and previous.shape[0]:
        loss = loss + lambda1 * (previous.to(A.dtype) @ A.mT).pow(2).sum()
    if lambda2:
        loss = loss + lambda2 * (A.pow(2).sum() + B.pow(2).sum())
    return loss


class OLoRA(Method):
    """O-LoRA (Wang et al., Findings of EMNLP 2023): a fresh LoRA per task (peft's init, both factors
    trained), earlier tasks' adapters merged into the weight (equivalent to frozen ones in the
    forward) and their down-projections ``A_i`` recorded for the orthogonality loss
    :func:`olora_penalty`, returned by :meth:`regularization` with ``λ₁ = config.olora_lambda1``
    (0.5) and ``λ₂ = config.olora_lambda2`` (0), the defaults of the authors' code."""

    name = "olora"
    trains_A = True
    options = {"olora_lambda1": "the weight of the orthogonality loss",
               "olora_lambda2": "the weight of the L2 loss on the adapters"}

    @classmethod
    def check_options(cls, config):
        """``config.olora_lambda1`` and ``config.olora_lambda2``: finite numbers ≥ 0, stored as floats.

        Raises:
            TypeError: a weight is not a number (bools and strings included).
            ValueError: a weight is negative or not finite.
        """
        for name in cls.options:
            setattr(config, name, at_least(name, getattr(config, name), 0))

    def __init__(self, config):
        super().__init__(config)
        self.previous: dict[str, torch.Tensor] = {}  # name → (t·r)×in, fp32

    def init_adapters(self, ctx, loader, loss_fn, fraction):
        _peft_init(ctx)

    def regularization(self, ctx):
        cfg = self.config
        total = super().regularization(ctx)
        for name, layer in ctx.layers.items():
            total = total + olora_penalty(self.previous.get(name), full(layer.lora_A), full(layer.lora_B),
                                          cfg.olora_lambda1, cfg.olora_lambda2).to(total.device)
        return total

    def end_task(self, ctx):
        for name, layer in ctx.layers.items():
            A = full(layer.lora_A.detach()).float()
            prev = self.previous.get(name)
            self.previous[name] = A.clone() if prev is None else torch.cat([prev, A.to(prev.device)])

    def state_tensors(self):
        return {f"olora_previous.{name}": A for name, A in self.previous.items()}

    def load_state_tensors(self, tensors, ctx):
        self.previous = {}
        for name, layer in ctx.layers.items():
            A = tensors.get(f"olora_previous.{name}")
            if A is not None:
                self.previous[name] = A.to(layer.weight.device).clone()  # fresh aligned memory: BLAS rounds by alignment


REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (KeepLoRAPlusPlus, KeepLoRAMethod, LoRA, LoRAFA,
                                                               InfLoRA, OLoRA)}


FULL_METHODS = tuple(name for name, cls in REGISTRY.items() if cls.supports_full)


def check_config(config, defaults: dict) -> None:
    """The method-specific rules of ``config`` (a ``KeepLoRAConfig`` whose ``method`` and ``adapter``
    are already known names): every method's options are checked (:meth:`Method.check_options`); an
    option of another method must keep its default (``defaults``: field → default); ``adapter="full"``
    needs a method whose ``supports_full`` is true. Raises ``TypeError``/``ValueError`` naming the field."""
    chosen = REGISTRY[config.method]
    for cls in {cls.check_options.__func__: cls for cls in REGISTRY.values()}.values():
        cls.check_options(config)
    for option in dict.fromkeys(o for cls in REGISTRY.values() for o in cls.options):
        if option in chosen.options or getattr(config, option) == defaults[option]:
            continue
        owners = [n for n, cls in REGISTRY.items() if option in cls.options]
        what = next(cls.options[option] for cls in REGISTRY.values() if option in cls.options)
        owned = f"method={owners[0]!r}" if len(owners) == 1 else "/".join(owners)
        raise ValueError(f"{option} ({what}) applies to {owned} only, got method={config.method!r} with "
                         f"{option}={getattr(config, option)!r}")
    if config.adapter == "full" and not chosen.supports_full:
        raise ValueError(f"adapter='full' works with method in {FULL_METHODS}, got method={config.method!r}")


def make_method(config) -> Method:
    """The strategy for ``config.method`` (a name of :data:`REGISTRY`)."""
    return REGISTRY[config.method](config)
