"""Finding and wrapping the linears to adapt: open_clip, transformers, any model by name pattern.

``nn.MultiheadAttention`` (open_clip's towers) packs q, k, v into one ``in_proj_weight``;
:func:`split_multihead_attention` replaces it by :class:`SplitMultiheadAttention` with separate
``q_proj``, ``k_proj``, ``v_proj`` linears (views of the packed weight, no copy) and the same
``out_proj``, so that each projection gets its own adapter and bases.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

# Module-path prefixes naming a tower (layer indices and depths are counted per tower).
_TOWERS = (("visual", r"(^|\.)(visual|vision_tower|vision_model)\."),
           ("text", r"^(transformer|text)\.|(^|\.)text_model\."))
_INDEX = re.compile(r"(?:^|\.)(?:resblocks|layers|layer|blocks|h)\.(\d+)\.")


class SplitMultiheadAttention(nn.Module):
    """Self-attention with the computation of ``nn.MultiheadAttention`` and separate q, k, v linears.

    Supports what open_clip uses: ``batch_first`` either way, additive or boolean ``attn_mask``
    (2-D, or 3-D with ``batch·heads`` leading), ``need_weights=False``. Returns ``(output, None)``.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise NotImplementedError("only self-attention with a packed in_proj_weight can be split")
        d = mha.embed_dim
        self.embed_dim, self.num_heads, self.batch_first, self.dropout = d, mha.num_heads, mha.batch_first, mha.dropout
        bias = mha.in_proj_bias
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            linear = nn.Linear(d, d, bias=bias is not None, device="meta")
            linear.weight = nn.Parameter(mha.in_proj_weight.data[i * d:(i + 1) * d], requires_grad=False)
            if bias is not None:
                linear.bias = nn.Parameter(bias.data[i * d:(i + 1) * d], requires_grad=False)
            setattr(self, name, linear)
        self.out_proj = mha.out_proj

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None or need_weights:
            raise NotImplementedError("SplitMultiheadAttention supports neither key_padding_mask nor need_weights")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, _ = query.shape
        heads, head_dim = self.num_heads, self.embed_dim // self.num_heads
        split = lambda t: t.reshape(n, -1, heads, head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(query)), split(self.k_proj(key)), split(self.v_proj(value))
        mask = attn_mask
        if mask is not None:
            if mask.dtype == torch.bool:  # nn.MultiheadAttention: True = may not attend
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(mask, float("-inf"))
            if mask.dim() == 3:
                mask = mask.reshape(n, heads, length, -1)
            mask = mask.to(q.dtype)
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def split_multihead_attention(model: nn.Module) -> int:
    """Replace every splittable ``nn.MultiheadAttention`` of ``model`` in place; returns the count."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention) and child._qkv_same_embed_dim:
                setattr(module, child_name, SplitMultiheadAttention(child))
                count += 1
    return count


@dataclass(frozen=True)
class Target:
    """An adapted linear: its module path, tower, index within the tower, and input group (linears
    of one group see the same input: q, k, v of one attention; gate, up of one MLP)."""

    name: str
    tower: str
    index: int
    input_group: str


def tower_of(name: str) -> str:
    for tower, pattern in _TOWERS:
        if re.search(pattern, name):
            return tower
    return "default"


def _input_group(name: str) -> str:
    """Linears that read the same tensor: q, k, v of an attention; gate and up of a gated MLP."""
    parent, _, leaf = name.rpartition(".")
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return parent + ":qkv"
    if leaf in ("gate_proj", "up_proj"):
        return parent + ":gate_up"
    return name


def find_targets(model: nn.Module, patterns, layer_index: dict | None = None) -> list[Target]:
    """Every ``nn.Linear`` whose module path matches one of ``patterns`` (``re.search``), with its
    tower and its layer index: ``layer_index[name]`` when given, else parsed from the path
    (``…layers.N…``, ``…resblocks.N…``)."""
    compiled = [re.compile(p) for p in patterns]
    layer_index = layer_index or {}
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not any(p.search(name) for p in compiled):
            continue
        match = _INDEX.search("." + name + ".")
        if name in layer_index:
            index = int(layer_index[name])
        elif match is not None:
            index = int(match.group(1))
        else:
            raise ValueError(f"cannot parse a layer index from the module path {name!r}; "
                             "pass it in layer_index={name: index} or adjust the target patterns")
        group = _input_group(name)
        targets.append(Target(name, tower_of(name), index, group))
    if not targets:
        raise ValueError(f"no nn.Linear matches the target patterns {list(patterns)}")
    return targets


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
