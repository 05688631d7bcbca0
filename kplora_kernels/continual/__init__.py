"""The KeepLoRA++ continual-learning controller, model adapters and metrics."""
from . import metrics
from .adapters import SplitMultiheadAttention, find_targets, split_multihead_attention
from .config import ADAPTERS, FULL_METHODS, METHODS, KeepLoRAConfig, preset
from .controller import KeepLoRA
from .methods import REGISTRY, Method, olora_penalty

__all__ = ["ADAPTERS", "FULL_METHODS", "KeepLoRA", "KeepLoRAConfig", "METHODS", "Method", "REGISTRY",
           "SplitMultiheadAttention", "find_targets", "metrics", "olora_penalty", "preset",
           "split_multihead_attention"]
