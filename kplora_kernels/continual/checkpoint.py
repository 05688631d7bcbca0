"""Checkpoints of the continual-learning engine: save, load (the full and the compact form, an open
task included), the replay of a compact checkpoint's merged updates, and the weight probes that tell
whether a target weight changed outside the library's merges.

:class:`CheckpointMixin` is a base of :class:`~.controller.KeepLoRA`; it uses the engine's
``config``, ``layers``, ``extra_parameters``, ``method``, ``adapter``, ``placement``,
``process_group``, the lifecycle state (``task_index``, ``task_open``, ``_merged_open_task``), the
update history (``_history``, ``_pretrained_fingerprints``) and ``_context()``/``_check_wrapped()``.
"""
from __future__ import annotations

import json
import logging
import os

import torch
from torch import nn

from ..atomic import write_atomically
from ..distributed import add_, assign_, barrier, full, is_rank0
from ..nn.function import low_rank_delta
from .bases import weight_fingerprint
from .config import KeepLoRAConfig
from .matching import TargetMatcher
from .placement import BasisPlacement

logger = logging.getLogger(__name__)

FORMAT = "kplora-controller/2"
READABLE_FORMATS = ("kplora-controller/1", FORMAT)
_SPEC_KEYS = ("targets", "target_modules", "exclude_modules")  # the TargetMatcher's fields in the config


class CheckpointMixin:
    """Save/load of the engine's whole state (see the module docstring for what it reads)."""

    @staticmethod
    @torch.no_grad()
    def _weight_probe(layer) -> torch.Tensor:
        """``W p`` (fp32, on the host) for a fixed seeded vector ``p``: any change of ``W`` changes it."""
        W = full(layer.weight.detach())
        p = torch.randn(W.shape[1], 1, generator=torch.Generator().manual_seed(0x6b706c))
        return (W.float() @ p.to(W.device)).cpu()

    def _record_weights(self) -> None:
        """Remember each target weight as the library left it (after wrapping, a merge or a load)."""
        self._weight_probes = {name: self._weight_probe(layer) for name, layer in self.layers.items()}

    def _weights_changed_outside(self) -> list[str]:
        """The target weights changed since the library last changed them (a user's edit, also through
        ``.data``, an optimizer that stepped them, a ``load_state_dict``): their probe product differs.
        One matrix-vector product per layer (version counters miss edits through ``.data``)."""
        return [name for name, layer in self.layers.items()
                if not torch.equal(self._weight_probe(layer), self._weight_probes[name])]

    def _layout(self) -> dict:
        layout = {name: [layer.out_features, layer.in_features, layer.rank, layer.layer_scale]
                  for name, layer in self.layers.items()}
        layout.update({f"extra.{n}": list(p.shape) for n, p in self.extra_parameters.items()})
        return layout

    def save(self, path: str, compact: bool | None = None) -> None:
        """Everything needed to continue the sequence (config, task index, whether a task is open, the
        bases and adapters, the method's and the adapter mode's records, the ``extra_trainable``
        parameters, and the adapted weights in one of two forms) as safetensors.

        ``compact=True`` stores only what cannot be recomputed from the pre-trained model: instead of
        the adapted weights, the history of merged updates (each task's ``B`` and ``A``, whose
        ``c·B A`` was folded into the weight) and a fingerprint of each pre-trained target weight.
        :meth:`load` onto the same pre-trained model re-applies the history with the arithmetic of
        the original merges, so a resume on the same device and library versions is bit-identical;
        a model whose pre-trained weights differ is refused. Per adapted ``out×in`` layer it drops the
        weight (``out·in`` numbers) and adds ``r·(out+in)`` per finished task; the bases stay. ViT-B/16,
        r = 16, fp32: the 156 MiB of the 96 target weights are replaced by 7.5 MiB of history per task,
        so after one task about 66 MiB instead of 214 MiB (the bases, about 50 MiB, dominate); the
        history grows by 7.5 MiB per task. ``compact=False`` stores the adapted weights
        themselves (the full form), for when the pre-trained weights will not be at hand.
        ``compact=None`` (default): compact when possible, else the full form — the compact form is
        impossible with ``adapter="full"`` (the update is not low-rank) and after loading a full-form
        checkpoint (the history is unknown); the form chosen is logged and recorded in the file.
        ``compact=True`` in those cases raises ``ValueError``.

        Written atomically: a temp file ``.<name>.kplora.tmp-<pid>-<token>`` beside ``path``, fsynced,
        renamed over ``path``, then the directory fsynced; temp files that an earlier crashed save left
        (their process is gone) are removed first. Under torch.distributed only rank 0 writes, and
        every rank waits for it; the file holds full tensors, so it loads under any world size.
        Raises ``FileNotFoundError`` when the directory of ``path`` does not exist."""
        self._check_wrapped("save")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        if compact is not None and not isinstance(compact, bool):
            raise TypeError(f"compact must be True, False or None, got {type(compact).__name__} {compact!r}")
        if compact and self._history is None:
            why = ("adapter='full' trains the whole weight, so its update is not low-rank"
                   if self.config.adapter == "full" else
                   "the weights were loaded from a full-form checkpoint, so the history of updates is unknown")
            raise ValueError(f"save(compact=True) is impossible: {why}; use compact=False (the full form)")
        if compact is not False and self._history is not None:
            edited = self._weights_changed_outside()
            if edited and compact:
                raise ValueError(f"save(compact=True) would lose work: {len(edited)} target weight(s) changed outside "
                                 f"the library's merges (first: {edited[:3]}), and a compact checkpoint only replays "
                                 "the recorded merges onto the pre-trained weights; use compact=False (the full form)")
            if edited:
                logger.warning("save: %d target weight(s) changed outside the library's merges (first: %s): writing "
                               "the full form, which keeps them", len(edited), edited[:3])
                compact = False
        if compact is None:
            compact = self._history is not None
            logger.info("save: writing the %s form to %s", "compact" if compact else "full", path)
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"save: the directory of path {path!r} does not exist ({directory}); create it first")
        tensors = {}  # gathered on every rank (DTensor shards under FSDP2), written by rank 0
        keys = ("lora_A", "lora_B", "V", "U") if compact else ("weight", "lora_A", "lora_B", "V", "U")
        for name, layer in self.layers.items():
            for key in keys:
                tensors[f"{name}.{key}"] = full(getattr(layer, key).detach()).cpu().contiguous().clone()
        if compact:
            for i, entry in enumerate(self._history):
                for name, (B, A) in entry.items():
                    tensors[f"history.{i}.{name}.B"] = B.contiguous()
                    tensors[f"history.{i}.{name}.A"] = A.contiguous()
        for name, p in self.extra_parameters.items():
            tensors[f"extra.{name}"] = full(p.detach()).cpu().contiguous().clone()
        for key, t in {**self.method.state_tensors(), **self.adapter.state_tensors(self._context())}.items():
            tensors[f"state.{key}"] = t.detach().cpu().contiguous().clone()
        extra_meta = ({"form": "compact", "history": len(self._history),
                       "fingerprints": dict(self._pretrained_fingerprints)} if compact else {"form": "full"})
        if is_rank0():
            self._write(path, tensors, extra_meta)
        barrier(self.process_group)

    def _write(self, path: str, tensors: dict, extra_meta: dict) -> None:
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "config": self.config.to_dict(), "task_index": self.task_index,
                "task_open": self.task_open, "merged_open_task": self._merged_open_task, "layout": self._layout(),
                "target_matcher": self.config.target_matcher.to_dict(),
                # indices the caller gave (a target in no block stack): from_checkpoint needs them again
                "layer_index": {t.name: t.index for t in self.targets if not t.stack},
                "V_complement": {n: l.V_complement for n, l in self.layers.items()}, **extra_meta}
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"kplora": json.dumps(meta)}),
                         what="controller checkpoint")

    @staticmethod
    def _read(path: str, with_tensors: bool = True):
        """``(meta, {name: tensor})`` of the checkpoint at ``path``; with ``with_tensors=False`` the
        metadata alone (no tensor is read) and an empty dict."""
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint at {path}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("kplora", "null"))
                tensors = {key: f.get_tensor(key) for key in f.keys()} if with_tensors else {}
        except Exception as exc:  # safetensors raises its own error types for bad files
            raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupt): {exc}") from exc
        if not meta or meta.get("format") not in READABLE_FORMATS:
            raise ValueError(f"{path} is not a kplora controller checkpoint (format {FORMAT})")
        return meta, tensors

    def load(self, path: str) -> None:
        """Restore a state written by :meth:`save` into this (freshly wrapped) model, an open task included;
        refuses a checkpoint of another architecture or configuration (``ValueError``). A compact
        checkpoint needs the model's target weights to be the pre-trained ones it was made from
        (checked by fingerprint, ``ValueError`` otherwise); its history of updates is then re-applied
        in order with the arithmetic of :meth:`FusedKeepLoRALinear.merge_`."""
        self._check_wrapped("load")
        meta, tensors = self._read(path)
        theirs_cfg = KeepLoRAConfig.from_dict(meta["config"]).to_dict()
        mine_cfg = self.config.to_dict()
        if "target_matcher" in meta:  # the target spec is compared below, as a value
            for key in _SPEC_KEYS:
                theirs_cfg.pop(key, None)
                mine_cfg.pop(key, None)
        if theirs_cfg != mine_cfg:
            diff = {k: (v, mine_cfg.get(k)) for k, v in theirs_cfg.items() if mine_cfg.get(k) != v}
            raise ValueError(f"checkpoint {path} was written with another configuration "
                             f"(key: (checkpoint, this)): {diff}")
        if "target_matcher" in meta:  # equal specs match the same modules, however they are written
            saved, current = TargetMatcher.from_dict(meta["target_matcher"]), self.config.target_matcher
            if saved != current:
                raise ValueError(f"checkpoint {path} adapts other modules: checkpoint {saved!r}, this model {current!r}")
        mine, theirs = self._layout(), meta["layout"]
        if mine != theirs:
            missing = sorted(set(theirs) - set(mine))[:3]
            extra = sorted(set(mine) - set(theirs))[:3]
            changed = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])[:3]
            raise ValueError(f"checkpoint {path} is for another architecture: layers only in the checkpoint "
                             f"{missing}, only in this model {extra}, of other shape {changed}")
        compact = meta.get("form", "full") == "compact"
        required = [f"{name}.{key}" for name in self.layers for key in ("lora_A", "lora_B", "V", "U")]
        required += [f"{name}.weight" for name in self.layers] if not compact else [
            f"history.{i}.{name}.{f}" for i in range(int(meta.get("history", 0))) for name in self.layers for f in "BA"]
        required += [f"extra.{name}" for name in self.extra_parameters]
        absent = [key for key in required if key not in tensors]
        if absent or (compact and "fingerprints" not in meta):
            raise ValueError(f"checkpoint {path} is incomplete: it lacks {len(absent)} tensor(s) this model needs "
                             f"(first: {absent[:3]}){' and the fingerprints' if compact and 'fingerprints' not in meta else ''}; "
                             "nothing was loaded")
        if compact:
            stored = meta["fingerprints"]
            differ = [n for n, layer in self.layers.items()
                      if weight_fingerprint(full(layer.weight.detach())) != stored[n]]
            if differ:
                raise ValueError(f"checkpoint {path} is compact: it holds the updates to the pre-trained weights, "
                                 f"not the weights, and {len(differ)} of {len(self.layers)} target weights of this "
                                 f"model differ from the pre-trained ones it was made from (first: {differ[:3]}); "
                                 "load it onto the same freshly built pre-trained model, or save with compact=False")
            history = [{name: (tensors[f"history.{i}.{name}.B"], tensors[f"history.{i}.{name}.A"])
                        for name in self.layers} for i in range(int(meta["history"]))]
            self._replay(history)
            self._history = history
            self._pretrained_fingerprints = dict(stored)
        else:
            self._history = None  # the weights arrive merged: their history is unknown
        with torch.no_grad():
            for name, layer in self.layers.items():
                dev = layer.weight.device
                if not compact:
                    assign_(layer.weight, tensors[f"{name}.weight"])
                layer.V_complement = bool(meta.get("V_complement", {}).get(name, False))
                layer.U = tensors[f"{name}.U"].to(dev).clone()
                layer.V = tensors[f"{name}.V"].to(dev).clone()
                self.placement.release(name, layer)  # one layer's bases on the device at a time
                assign_(layer.lora_A, tensors[f"{name}.lora_A"])
                assign_(layer.lora_B, tensors[f"{name}.lora_B"])
            for name, p in self.extra_parameters.items():
                assign_(p, tensors[f"extra.{name}"])
        state = {k[len("state."):]: t for k, t in tensors.items() if k.startswith("state.")}
        self.task_index = meta["task_index"]
        self.task_open = bool(meta.get("task_open", False))
        self._merged_open_task = bool(meta.get("merged_open_task", False))
        self.method.load_state_tensors(state, self._context())
        self.adapter.load_state_tensors(self._context(), state, self.task_open)
        self._record_weights()
        self.placement.offload(self.layers)  # the loaded bases go where the placement keeps them (mmap: written)

    @torch.no_grad()
    def _replay(self, history: list) -> None:
        """Fold each recorded update into its weight, in order, exactly as
        :meth:`FusedKeepLoRALinear.merge_` did (``W ← W + c·(B A)`` in fp32, fp64 for fp64 weights);
        the factors are copied into fresh memory on the weight's device first (BLAS rounding can
        depend on alignment)."""
        for entry in history:
            for name, (B, A) in entry.items():
                layer = self.layers[name]
                dev = layer.weight.device
                delta = low_rank_delta(B.to(dev).clone(), A.to(dev).clone(), layer.scaling, layer.weight.dtype)
                add_(layer.weight, delta)

    @classmethod
    def from_checkpoint(cls, model: nn.Module, path: str, *, progress: bool = True,
                        placement: "str | BasisPlacement" = "cpu", layer_index: dict | None = None) -> "KeepLoRA":
        """Wrap a freshly built ``model`` with the checkpoint's configuration and restore its state.
        The placement is not part of the checkpoint: the bases go where ``placement`` keeps them, one
        layer at a time. The layer indices given at wrap time (``layer_index``) are saved and reused;
        ``layer_index`` here overrides them.

        Raises ``FileNotFoundError`` (no file at ``path``), ``ValueError`` (not a controller checkpoint,
        unreadable, another architecture, a model already wrapped, or — compact form — other
        pre-trained weights)."""
        meta, _ = cls._read(path, with_tensors=False)  # load() reads the tensors
        given = meta.get("layer_index") if layer_index is None else layer_index
        kl = cls(model, KeepLoRAConfig.from_dict(meta["config"]), progress=progress, compute_bases=False,
                 placement=placement, layer_index=given or None)
        kl.load(path)
        return kl
