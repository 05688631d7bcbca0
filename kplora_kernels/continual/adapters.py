"""Adapting a model, re-exported: target matching in :mod:`.matching`, target discovery and layer depths in :mod:`.targets`, module surgery (attention split, replace, merge and unload) in :mod:`.surgery`."""
from .matching import DEFAULT_TOWERS, TargetMatcher, peft_matcher, regex_matcher, target_matcher
from .surgery import SplitMultiheadAttention, merge_and_unload, replace_module, split_multihead_attention
from .targets import Target, find_targets, layer_report, layer_scale

__all__ = ["DEFAULT_TOWERS", "SplitMultiheadAttention", "Target", "TargetMatcher", "find_targets", "layer_report",
           "layer_scale", "merge_and_unload", "peft_matcher", "regex_matcher", "replace_module",
           "split_multihead_attention", "target_matcher"]
