"""One KeepLoRA task per ``transformers.Trainer.train()``: :class:`KeepLoRACallback`.

The callback drives the controller's lifecycle from the Trainer's events, so that a Hugging Face
training script keeps its own ``Trainer`` (and with it accelerate's DDP, gradient accumulation,
mixed precision, logging and checkpointing):

- ``on_train_begin``: the task-start gradient pass (:meth:`KeepLoRA.begin_task`) over the Trainer's
  train dataloader (or its first ``fraction``), then a fresh optimizer state (a task starts from
  ``B = 0``, so Adam's moments of the previous task are meaningless) and the projection hook on the
  Trainer's optimizer (``B ← (I−UUᵀ)B`` after every step; a no-op without an output basis);
- ``on_save``: the controller state beside the Trainer's checkpoint, as
  ``checkpoint-<step>/keeplora.safetensors`` (written by rank 0, atomically);
- ``on_train_end``: :meth:`KeepLoRA.end_task` (merge, input pass, GPM expansion) over the same
  dataloader, and the state as ``<output_dir>/keeplora.safetensors``.

Wrap the model with :class:`KeepLoRA` *before* building the ``Trainer`` (the Trainer builds its
optimizer from the parameters that require a gradient when ``train()`` starts). Under
``torch.distributed`` every rank runs the callback; the controller sums its sketches over ranks.
"""
from __future__ import annotations

import collections
import collections.abc
import logging
import os

import torch

try:  # transformers is an optional dependency ([hf] extra)
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("kplora_kernels.continual.trainer needs transformers: pip install 'kplora_kernels[hf]'") from exc

logger = logging.getLogger(__name__)

STATE_FILE = "keeplora.safetensors"


def _to_device(batch, device):
    """Move the tensors of a (nested) batch to ``device``; accelerate's dataloaders already did."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, collections.abc.Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def default_loss_fn(model, batch):
    """``model(**batch).loss``: the loss a transformers model returns when ``batch`` has ``labels``."""
    out = model(**_to_device(batch, _device_of(model)))
    loss = out["loss"] if isinstance(out, collections.abc.Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("loss_fn: the model returned no loss for a train batch (does the batch hold 'labels'?); "
                         "pass KeepLoRACallback(..., loss_fn=lambda model, batch: ...) for this model")
    return loss


def default_forward_fn(model, batch):
    """``model(**batch)``: a forward pass whose inputs the adapted linears record at the task end."""
    return model(**_to_device(batch, _device_of(model)))


def _inner_optimizer(optimizer):
    """The ``torch.optim.Optimizer`` inside accelerate's ``AcceleratedOptimizer`` (itself a subclass that
    forwards ``step`` without running the hooks of the optimizer it wraps), or ``optimizer`` itself."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer (or a wrapper holding one in "
                        f".optimizer), got {type(optimizer).__name__}")
    return optimizer


class KeepLoRACallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` running one KeepLoRA task per ``trainer.train()``.

    Args:
        keeplora: the :class:`~kplora_kernels.continual.KeepLoRA` controller wrapping the Trainer's
            model (the unwrapped model: ``keeplora.model is trainer.model``).
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` for the task-start gradient pass; default
            :func:`default_loss_fn` (``model(**batch).loss``).
        forward_fn: ``forward_fn(model, batch)`` for the task-end input pass; default
            :func:`default_forward_fn`.
        fraction: the share of the train dataloader, in (0, 1], that both boundary passes read.
        save_state: write the controller state beside the Trainer's checkpoints and at the end.

    Raises:
        TypeError: ``keeplora`` is not a KeepLoRA controller, or a function argument is not callable.
        ValueError: ``fraction`` outside (0, 1]; at ``on_train_begin``, the Trainer's model is not the
            controller's, or a parameter the task trains is missing from the Trainer's optimizer.
    """

    def __init__(self, keeplora, loss_fn=None, forward_fn=None, fraction: float = 1.0, save_state: bool = True):
        from .controller import KeepLoRA

        if not isinstance(keeplora, KeepLoRA):
            raise TypeError(f"keeplora: expected a KeepLoRA controller, got {type(keeplora).__name__}")
        for name, fn in (("loss_fn", loss_fn), ("forward_fn", forward_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name}: expected a callable (model, batch), got {type(fn).__name__}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction: expected a number in (0, 1], got {fraction!r}")
        self.keeplora, self.fraction, self.save_state = keeplora, float(fraction), save_state
        self.loss_fn = loss_fn or default_loss_fn
        self.forward_fn = forward_fn or default_forward_fn
        self._hook = None

    def _check_model(self, model) -> None:
        if model is not None and model is not self.keeplora.model:
            raise ValueError("model: the Trainer's model is not the one KeepLoRA wrapped; wrap the model with "
                             "KeepLoRA first and pass that same model to the Trainer")

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self._check_model(model)
        if train_dataloader is None:
            raise ValueError("train_dataloader: the Trainer passed none to on_train_begin; KeepLoRA needs the "
                             "task's data for its task-start gradient pass")
        kl, inner = self.keeplora, _inner_optimizer(optimizer)
        if state.global_step > 0:  # resumed mid-task: the task is open in the checkpoint being resumed
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"resume: the Trainer resumes at step {state.global_step} but {path} (the "
                                        "KeepLoRA state saved beside that checkpoint) does not exist")
            kl.load(path)
            logger.info("KeepLoRA: task %d resumed from %s", kl.task_index, path)
        else:
            logger.info("KeepLoRA: task %d starts (task-start gradient pass over %.0f%% of the train data)",
                        kl.task_index, 100 * self.fraction)
            kl.begin_task(train_dataloader, self.loss_fn, fraction=self.fraction)
            inner.state = collections.defaultdict(dict)  # a new task starts from B = 0: no Adam moments carried over
        in_optimizer = {id(p) for group in inner.param_groups for p in group["params"]}
        missing = [n for n, p in kl.model.named_parameters()
                   if p.requires_grad and id(p) not in in_optimizer and
                   any(p is q for q in kl.trainable_parameters())]
        if missing:
            raise ValueError(f"optimizer: the Trainer's optimizer lacks {len(missing)} parameter(s) this task trains "
                             f"(e.g. {missing[:3]}); they must require a gradient before trainer.train() starts")
        self._hook = kl.register_projection_hook(inner)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.save_state:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            self.keeplora.save(os.path.join(folder, STATE_FILE))
        return control

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._check_model(model)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        kl = self.keeplora
        report = kl.end_task(train_dataloader, self.forward_fn, fraction=self.fraction)
        logger.info("KeepLoRA: task %d ended (adapters merged, protected subspaces expanded in %d data pass(es), "
                    "least captured input energy %.4f)", report.task, report.passes, report.min_energy)
        if self.save_state:
            os.makedirs(args.output_dir, exist_ok=True)
            kl.save(os.path.join(args.output_dir, STATE_FILE))
        return control
