"""The KeepLoRA++ continual-learning controller, model adapters and metrics.

``KeepLoRACallback`` (a ``transformers.TrainerCallback``) is imported on first access, so that
transformers stays optional."""
from . import metrics
from .adapters import (SplitMultiheadAttention, Target, TargetMatcher, find_targets, layer_report, layer_scale,
                       merge_and_unload, peft_matcher, split_multihead_attention, target_matcher)
from .config import ADAPTERS, FULL_METHODS, METHODS, KeepLoRAConfig, preset
from .controller import KeepLoRA
from .methods import REGISTRY, Method, olora_penalty

__all__ = ["ADAPTERS", "FULL_METHODS", "KeepLoRA", "KeepLoRACallback", "KeepLoRAConfig", "METHODS", "Method",
           "REGISTRY", "SplitMultiheadAttention", "Target", "TargetMatcher", "find_targets", "layer_report",
           "layer_scale", "merge_and_unload", "metrics", "olora_penalty", "peft_matcher", "preset",
           "split_multihead_attention", "target_matcher"]


def __getattr__(name):
    if name == "KeepLoRACallback":  # needs transformers
        from .trainer import KeepLoRACallback

        return KeepLoRACallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
