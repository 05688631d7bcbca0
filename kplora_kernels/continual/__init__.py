"""The KeepLoRA++ continual-learning controller, model adapters and metrics."""
from . import metrics
from .adapters import SplitMultiheadAttention, find_targets, split_multihead_attention
from .config import METHODS, KeepLoRAConfig, preset
from .controller import KeepLoRA

__all__ = ["KeepLoRA", "KeepLoRAConfig", "METHODS", "SplitMultiheadAttention", "find_targets", "metrics",
           "preset", "split_multihead_attention"]
