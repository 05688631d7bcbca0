"""Continual-learning methods as strategies driven by one engine (:class:`~.controller.KeepLoRA`).

A method says, for every adapted linear: whether the pre-trained weight's principal subspace is
protected and whether the layer gets the depth scale ``s_l`` (at wrap time), how ``A`` and ``B`` are
set at a task start and whether ``A`` trains, what extra loss it adds (:meth:`Method.regularization`),
what it records at a task end, and whether the protected input basis grows from the task's inputs.
The engine runs every method through the same ``begin_task`` → train → ``end_task`` lifecycle, the
same fused layer and the same checkpoints. How the weight itself is trained (a LoRA adapter merged
at each task end, or the whole weight with its gradient projected) is the engine's ``adapter``
strategy (:mod:`.adapter_modes`), orthogonal to the method.

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
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..nn.linear import full
from ..subspace import GradientSketch

if TYPE_CHECKING:  # pragma: no cover
    from .controller import KeepLoRA


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
    supports_full: ClassVar[bool] = False  # meaningful with adapter="full"

    def __init__(self, config):
        self.config = config

    # --- task start (adapter="lora" only) ------------------------------------------------------------
    def init_adapters(self, engine: "KeepLoRA", loader, loss_fn, fraction: float) -> None:
        """Set every layer's ``A`` (``r×in``) and ``B = 0`` for task ``engine.task_index``."""
        raise NotImplementedError

    # --- training --------------------------------------------------------------------------------------
    def regularization(self, engine: "KeepLoRA") -> torch.Tensor:
        """The method's extra loss for the current task (a scalar tensor; 0 when it has none)."""
        device = next(iter(engine.layers.values())).weight.device
        return torch.zeros((), device=device)

    # --- task end -----------------------------------------------------------------------------------
    def end_task(self, engine: "KeepLoRA") -> None:
        """Record what the method keeps of the finished task (after the adapters are merged)."""

    # --- checkpoints --------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], engine: "KeepLoRA") -> None:
        pass


def _peft_init(engine: "KeepLoRA") -> None:
    """peft's ``LoraLayer`` initialisation for every layer, drawn in peft's order from the task's seed."""
    gen = _generator(engine.config.seed + engine.task_index)
    for layer in engine.layers.values():
        A = torch.empty(layer.rank, layer.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)  # nn.Linear(in, r) of update_layer
        nn.init.kaiming_uniform_(torch.empty(layer.out_features, layer.rank), a=math.sqrt(5), generator=gen)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)  # reset_lora_parameters
        layer.reset_adapter(engine.broadcast(A.to(layer.weight.device)))


class KeepLoRAMethod(Method):
    """KeepLoRA (docs/design.md §1): residual-subspace LoRA with gradient-informed ``A``."""

    name = "keeplora"
    protects_pretrained = grows_input_basis = supports_full = True

    def init_adapters(self, engine, loader, loss_fn, fraction):
        cfg, sketches = self.config, {}
        for name, layer in engine.layers.items():
            sketches[name] = GradientSketch(layer.out_features, layer.in_features, layer.rank,
                                            U=layer.U if layer.U.shape[1] else None, V=layer.V,
                                            V_complement=layer.V_complement,
                                            memory_budget=cfg.sketch_memory_budget,
                                            seed=cfg.seed + engine.task_index, device=layer.weight.device)
            layer.grad_accumulator = sketches[name]
        count = 0
        try:
            for batch in engine.batches(loader, fraction, "task gradient"):
                loss_fn(engine.model, batch).backward()
                count += 1
        finally:
            for layer in engine.layers.values():
                layer.grad_accumulator = None
            for p in engine.trainable_parameters():
                p.grad = None  # the estimation pass is not a training step
        if count == 0:
            raise ValueError("begin_task: the loader yielded no batch, so the task gradient is unknown "
                             "(pass a non-empty loader)")
        for name, layer in engine.placement.stream(engine.layers):  # its bases on the device, the next on the way
            sketch = sketches.pop(name)
            sketch.all_reduce(engine.process_group)  # a no-op without torch.distributed
            A = sketch.adapter_init(U=layer.U if layer.U.shape[1] else None, V=layer.V)
            layer.reset_adapter(engine.broadcast(A.to(layer.weight.device)))


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

    def init_adapters(self, engine, loader, loss_fn, fraction):
        _peft_init(engine)


class LoRAFA(Method):
    """LoRA-FA: a frozen random orthonormal ``A`` per task (seeded), only ``B`` trains from zero."""

    name = "lora-fa"

    def init_adapters(self, engine, loader, loss_fn, fraction):
        gen = _generator(self.config.seed + engine.task_index)
        for layer in engine.layers.values():
            A = torch.linalg.qr(torch.randn(layer.in_features, layer.rank, generator=gen))[0].mT
            layer.reset_adapter(engine.broadcast(A.contiguous().to(layer.weight.device)))


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

    def init_adapters(self, engine, loader, loss_fn, fraction):
        sketches = engine.collect_inputs(loader, loss_fn, fraction, "task inputs")
        for name, layer in engine.placement.stream(engine.layers):  # its bases on the device, the next on the way
            sketch = sketches.pop(name)
            V = layer.V if (layer.V.shape[1] or layer.V_complement) else None
            # a few more than r: residual_directions drops any that rounding left inside span(V)
            vecs = sketch.top_residual_directions(2 * layer.rank, V, layer.V_complement)
            A = residual_directions(layer, vecs, layer.rank, self.config.seed + engine.task_index)
            layer.reset_adapter(engine.broadcast((self.SCALE * A).to(layer.weight.dtype)))


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

    def __init__(self, config):
        super().__init__(config)
        self.previous: dict[str, torch.Tensor] = {}  # name → (t·r)×in, fp32

    def init_adapters(self, engine, loader, loss_fn, fraction):
        _peft_init(engine)

    def regularization(self, engine):
        cfg = self.config
        total = super().regularization(engine)
        for name, layer in engine.layers.items():
            total = total + olora_penalty(self.previous.get(name), full(layer.lora_A), full(layer.lora_B),
                                          cfg.olora_lambda1, cfg.olora_lambda2).to(total.device)
        return total

    def end_task(self, engine):
        for name, layer in engine.layers.items():
            A = full(layer.lora_A.detach()).float()
            prev = self.previous.get(name)
            self.previous[name] = A.clone() if prev is None else torch.cat([prev, A.to(prev.device)])

    def state_tensors(self):
        return {f"olora_previous.{name}": A for name, A in self.previous.items()}

    def load_state_tensors(self, tensors, engine):
        self.previous = {}
        for name, layer in engine.layers.items():
            A = tensors.get(f"olora_previous.{name}")
            if A is not None:
                self.previous[name] = A.to(layer.weight.device).clone()  # fresh aligned memory: BLAS rounds by alignment


REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (KeepLoRAPlusPlus, KeepLoRAMethod, LoRA, LoRAFA,
                                                               InfLoRA, OLoRA)}


def make_method(config) -> Method:
    """The strategy for ``config.method`` (a name of :data:`REGISTRY`)."""
    return REGISTRY[config.method](config)
