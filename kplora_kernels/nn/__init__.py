"""``FusedKeepLoRALinear`` and the hook interfaces it feeds."""
from .hooks import GradientAccumulator, InputAccumulator
from .linear import FusedKeepLoRALinear, register_projection_hooks

__all__ = ["FusedKeepLoRALinear", "GradientAccumulator", "InputAccumulator", "register_projection_hooks"]
