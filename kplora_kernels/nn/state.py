"""The state-dict side of :class:`~kplora_kernels.nn.linear.FusedKeepLoRALinear`: the extra state
(``[version, merged, rank, alpha, layer_scale, V_complement]``), the bases ``V`` (``in×k_in``) and
``U`` (``out×k_out``) saved as state-dict keys though they are not module buffers, and an
all-or-nothing load that checks every value before changing anything.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_basis, check_finite

_BASES = ("V", "U")
_STATE_VERSION = 1.0


class LayerState(nn.Module):
    """State-dict methods of :class:`~kplora_kernels.nn.linear.FusedKeepLoRALinear` (its base class;
    the attributes it reads: ``merged``, ``rank``, ``alpha``, ``layer_scale``, ``V_complement``,
    ``in_features``, ``out_features``, ``bias``, ``V``, ``U``)."""

    def get_extra_state(self) -> torch.Tensor:
        """The non-tensor state as one fp64 CPU tensor ``[version, merged, rank, alpha, layer_scale,
        V_complement]``: tensors only, so that any state-dict writer (safetensors, transformers'
        ``save_pretrained``) can store it."""
        return torch.tensor([_STATE_VERSION, float(self.merged), float(self.rank), self.alpha,
                             self.layer_scale, float(self.V_complement)], dtype=torch.float64)

    @staticmethod
    def _parse_extra_state(state) -> dict:
        """The extra state as a dict, from the tensor form or the older dict form."""
        if isinstance(state, dict):
            missing = {"merged", "rank", "alpha", "layer_scale"} - set(state)
            if missing:
                raise ValueError(f"state_dict's _extra_state lacks the keys {sorted(missing)}")
            return {"merged": bool(state["merged"]), "rank": state["rank"], "alpha": float(state["alpha"]),
                    "layer_scale": float(state["layer_scale"]),
                    "V_complement": bool(state.get("V_complement", False))}
        if not isinstance(state, torch.Tensor) or state.dim() != 1 or state.numel() != 6:
            raise ValueError("state_dict's _extra_state must be a 6-element tensor "
                             "[version, merged, rank, alpha, layer_scale, V_complement] (or the older dict), "
                             f"got {type(state).__name__} {tuple(state.shape) if isinstance(state, torch.Tensor) else ''}")
        values = state.double().tolist()
        if values[0] != _STATE_VERSION or not all(math.isfinite(v) for v in values):
            raise ValueError(f"state_dict's _extra_state {values} is not a version-1 state of finite values")
        return {"merged": bool(values[1]), "rank": int(values[2]), "alpha": values[3], "layer_scale": values[4],
                "V_complement": bool(values[5])}

    def set_extra_state(self, state) -> None:
        parsed = self._parse_extra_state(state)
        if parsed["rank"] != self.rank:
            raise ValueError(f"state_dict has rank {parsed['rank']}, this layer has rank {self.rank}")
        self.merged, self.alpha, self.layer_scale = parsed["merged"], parsed["alpha"], parsed["layer_scale"]
        self.V_complement = parsed["V_complement"]

    def _check_state(self, state_dict: dict, prefix: str) -> None:
        """Every value this layer would load from ``state_dict``, checked before anything is changed
        (a ValueError naming the key), so that a failed load leaves the layer as it was."""
        complement = self.V_complement
        if prefix + "_extra_state" in state_dict:
            parsed = self._parse_extra_state(state_dict[prefix + "_extra_state"])
            if parsed["rank"] != self.rank:
                raise ValueError(f"state_dict has rank {parsed['rank']}, this layer has rank {self.rank}")
            complement = parsed["V_complement"]
        shapes = {"weight": (self.out_features, self.in_features), "bias": (self.out_features,),
                  "lora_A": (self.rank, self.in_features), "lora_B": (self.out_features, self.rank)}
        for key, shape in shapes.items():
            value = state_dict.get(prefix + key)
            if value is None or (key == "bias" and self.bias is None):
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"state_dict[{prefix + key!r}] must be a tensor, got {type(value).__name__}")
            if tuple(value.shape) != shape:
                raise ValueError(f"state_dict[{prefix + key!r}] must have shape {shape}, got {tuple(value.shape)}")
            if key.startswith("lora_"):
                check_finite(f"state_dict[{prefix + key!r}]", value)
        for key, dim, what in (("V", self.in_features, "in_features"), ("U", self.out_features, "out_features")):
            value = state_dict.get(prefix + key)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"state_dict[{prefix + key!r}] must be a tensor, got {type(value).__name__}")
            check_basis(f"state_dict[{prefix + key!r}]", value, dim, what)
            if key == "V":
                room = value.shape[1] if complement else dim - value.shape[1]
                if room < self.rank:
                    raise ValueError(f"state_dict[{prefix + key!r}] leaves a residual space of {room} "
                                     f"dimensions, fewer than rank = {self.rank}")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key in _BASES:
            destination[prefix + key] = getattr(self, key)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._check_state(state_dict, prefix)
        if strict:  # report missing and unexpected keys without loading the others (all or nothing)
            local = [n for n, p in self._parameters.items() if p is not None]
            local += [n for n, b in self._buffers.items() if b is not None and n not in self._non_persistent_buffers_set]
            local += [*_BASES, "_extra_state"]
            missing = [prefix + n for n in local if prefix + n not in state_dict]
            unexpected = [k for k in state_dict if k.startswith(prefix)
                          and k[len(prefix):].split(".")[0] not in local and k[len(prefix):].split(".")[0]
                          not in self._modules]
            if missing or unexpected:
                missing_keys.extend(missing)
                unexpected_keys.extend(unexpected)
                return
        bases = {key: state_dict[prefix + key] for key in _BASES if prefix + key in state_dict}
        if bases:  # not module state: the base class would report them as unexpected
            state_dict = {k: v for k, v in state_dict.items() if k not in {prefix + key for key in _BASES}}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        with torch.no_grad():
            for key, stored in bases.items():  # the bases grow from task to task: take the stored size
                mine = getattr(self, key)
                setattr(self, key, stored.detach().to(device=mine.device, dtype=mine.dtype, copy=True))
