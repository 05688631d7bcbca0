"""Module surgery: putting adapters where they run, and taking them out again.

``nn.MultiheadAttention`` (open_clip's towers) packs q, k, v into one ``in_proj_weight`` and reads
``out_proj.weight`` directly, so none of its projections can be adapted as it stands.
:func:`split_multihead_attention` replaces the targeted ones by :class:`SplitMultiheadAttention`,
with separate ``q_proj``, ``k_proj``, ``v_proj`` linears (views of the packed weight, no copy) and
the same ``out_proj``, which computes what ``nn.MultiheadAttention`` computes (to rounding) and
calls its four linears as modules. :func:`replace_module` puts a wrapped linear in place;
:func:`merge_and_unload` folds the adapters in and re-packs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..nn import FusedKeepLoRALinear
from .matching import as_matcher

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


class SplitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its four projections as separate linears ``q_proj``, ``k_proj``,
    ``v_proj`` (``embed_dim×embed_dim``, ``embed_dim×kdim``, ``embed_dim×vdim``) and ``out_proj``, each
    called as a module so that an adapter put in its place runs.

    Everything ``nn.MultiheadAttention`` supports is kept: ``batch_first`` either way, unbatched
    inputs, ``kdim``/``vdim`` (cross-attention), ``bias``, ``add_bias_kv``, ``add_zero_attn``,
    attention dropout, additive or boolean ``attn_mask`` (2-D, or 3-D with ``batch·heads`` leading),
    ``key_padding_mask``, ``need_weights`` (default True, as there; head-averaged unless
    ``average_attn_weights=False``) and ``is_causal``. Returns ``(output, weights or None)``.
    The outputs equal the packed module's to rounding (the packed module may take a fused path).

    ``_qkv_same_embed_dim`` is False, as for an attention with separate weights: the fused inference
    paths of ``nn.TransformerEncoderLayer`` check it and then call the module instead of reading
    its packed weights (which would skip the adapters).
    """

    _qkv_same_embed_dim = False

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        d = mha.embed_dim
        self.embed_dim, self.kdim, self.vdim = d, mha.kdim, mha.vdim
        self.num_heads, self.head_dim, self.batch_first, self.dropout = mha.num_heads, mha.head_dim, mha.batch_first, mha.dropout
        self.add_zero_attn = mha.add_zero_attn
        self.bias_k, self.bias_v = mha.bias_k, mha.bias_v  # the same parameters (or None)
        bias = mha.in_proj_bias
        if mha._qkv_same_embed_dim:
            weights = [mha.in_proj_weight[i * d:(i + 1) * d] for i in range(3)]  # views: no copy
        else:
            weights = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
        for i, (name, W) in enumerate(zip(("q_proj", "k_proj", "v_proj"), weights)):
            linear = nn.Linear(W.shape[1], d, bias=bias is not None, device="meta")
            linear.weight = nn.Parameter(W.data, requires_grad=W.requires_grad)
            if bias is not None:
                linear.bias = nn.Parameter(bias.data[i * d:(i + 1) * d], requires_grad=bias.requires_grad)
            setattr(self, name, linear)
        self.out_proj = mha.out_proj
        self.train(mha.training)  # a split attention in an eval model stays in eval mode (no dropout)

    @property
    def in_proj_bias(self):
        """The packed bias ``[b_q; b_k; b_v]`` (``3·embed_dim``), or None, as ``nn.MultiheadAttention``
        has it (biases are not adapted)."""
        if self.q_proj.bias is None:
            return None
        return torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        F = nn.functional
        batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if not batched:  # (L, E) → (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, _ = query.shape
        heads, head_dim, source = self.num_heads, self.head_dim, key.shape[1]
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (n, source):
            raise ValueError(f"key_padding_mask must have shape (batch, source length) = {(n, source)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            expected = (length, source) if attn_mask.dim() == 2 else (n * heads, length, source)
            if tuple(attn_mask.shape) != expected:
                raise ValueError(f"attn_mask must have shape {expected} (a 3-D mask: batch·heads first), "
                                 f"got {tuple(attn_mask.shape)}")
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal needs attn_mask, as in nn.MultiheadAttention (it is a hint that "
                               "attn_mask is the causal mask)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)  # (N, L|S, E)
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.dim() == 2 else attn_mask.view(n, heads, *attn_mask.shape[1:])
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)  # (1, 1, L, S) or (N, H, L, S)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.to(k.dtype).expand(n, 1, -1)], 1)
            v = torch.cat([v, self.bias_v.to(v.dtype).expand(n, 1, -1)], 1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q, k, v = (t.reshape(n, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))  # (N, H, L|S, hd)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, heads, 1, head_dim)], 2)
            v = torch.cat([v, v.new_zeros(n, heads, 1, head_dim)], 2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        if key_padding_mask is not None:
            padding = key_padding_mask.view(n, 1, 1, k.shape[2])
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                 is_causal=is_causal and attn_mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.embed_dim))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    @torch.no_grad()
    def to_multihead_attention(self) -> nn.MultiheadAttention:
        """The packed ``nn.MultiheadAttention`` with this module's weights (q, k, v concatenated into
        ``in_proj_weight`` when ``kdim = vdim = embed_dim``). Its projections must be plain linears
        (call :func:`merge_and_unload` to fold adapters in first)."""
        linears = [getattr(self, name) for name in _PROJECTIONS]
        for name, linear in zip(_PROJECTIONS, linears):
            if isinstance(linear, FusedKeepLoRALinear) or not isinstance(linear, nn.Linear):
                raise TypeError(f"{name} is a {type(linear).__name__}, not a plain nn.Linear: unload its "
                                "adapter first (merge_and_unload)")
        q, k, v, out = linears
        W = q.weight
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, bias=q.bias is not None,
                                    add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn,
                                    kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first,
                                    device="meta", dtype=W.dtype)
        frozen = not any(p.requires_grad for lin in (q, k, v) for p in lin.parameters())
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight = nn.Parameter(torch.cat([q.weight, k.weight, v.weight]), requires_grad=not frozen)
        else:
            mha.q_proj_weight = nn.Parameter(q.weight.detach(), requires_grad=q.weight.requires_grad)
            mha.k_proj_weight = nn.Parameter(k.weight.detach(), requires_grad=k.weight.requires_grad)
            mha.v_proj_weight = nn.Parameter(v.weight.detach(), requires_grad=v.weight.requires_grad)
        if q.bias is not None:
            mha.in_proj_bias = nn.Parameter(torch.cat([q.bias, k.bias, v.bias]), requires_grad=not frozen)
        mha.bias_k, mha.bias_v = self.bias_k, self.bias_v
        mha.out_proj = out
        mha.train(self.training)
        return mha


def _attention_targeted(model: nn.Module, name: str, matches: Callable[[str], bool]) -> bool:
    """Is a projection of the attention ``name`` a target, or (for the ``self_attn`` of an
    ``nn.TransformerEncoderLayer``) one of the layer's linears, which its fused path reads directly?"""
    prefix = name + "." if name else ""
    if any(matches(prefix + p) for p in _PROJECTIONS):
        return True
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.TransformerEncoderLayer) and child == "self_attn":
        parent_prefix = parent_name + "." if parent_name else ""
        return any(matches(parent_prefix + linear) for linear in ("linear1", "linear2"))
    return False


def _fused_path_readers(model: nn.Module) -> dict[str, str]:
    """Linears that a fused inference path reads by ``.weight`` instead of calling, so that an
    adapter in their place would be skipped: ``{linear path: why}``."""
    readers = {}
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        if isinstance(module, nn.MultiheadAttention):
            readers[prefix + "out_proj"] = ("the out_proj of an nn.MultiheadAttention that is still packed: it reads "
                                            "out_proj.weight directly")
        elif isinstance(module, nn.TransformerEncoderLayer) and isinstance(module.self_attn, nn.MultiheadAttention):
            for linear in ("linear1", "linear2"):
                readers[prefix + linear] = (f"the {linear} of an nn.TransformerEncoderLayer whose self_attn is still "
                                            f"packed: its fused inference path reads {linear}.weight directly")
    return readers


def split_multihead_attention(model: nn.Module, patterns=None, *, target_modules=None, exclude_modules=None,
                              matcher=None) -> int:
    """Replace ``nn.MultiheadAttention`` modules of ``model`` in place by
    :class:`SplitMultiheadAttention`; returns the count. With a target spec (``patterns`` or
    ``target_modules``, optionally ``exclude_modules``, or a ready
    :class:`~kplora_kernels.continual.matching.TargetMatcher` as ``matcher``) only the attentions one
    of whose projections ``<name>.q_proj``/``k_proj``/``v_proj``/``out_proj`` is a target are split,
    the others stay as they are; without one, every attention is split."""
    matches = None
    if (patterns, target_modules, matcher) != (None, None, None):
        matches = as_matcher(patterns, target_modules, exclude_modules, matcher).matches_name
    elif exclude_modules is not None:
        raise ValueError(f"exclude_modules={exclude_modules!r} needs a target spec (patterns or target_modules)")
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full_name = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.MultiheadAttention):
                continue
            if matches is not None and not _attention_targeted(model, full_name, matches):
                continue
            setattr(module, child_name, SplitMultiheadAttention(child))
            count += 1
    for module in model.modules():  # its nested-tensor path reads the packed weights of layer 0
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(layer.self_attn, SplitMultiheadAttention) for layer in module.layers):
            module.use_nested_tensor = False
    return count


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the module path ``name`` of ``model`` (``"a.b.3.c"``: ``model.a.b[3].c = new``).
    Raises ``AttributeError`` (from ``get_submodule``) when the parent path does not exist."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# --- leaving the library ----------------------------------------------------------------------------

@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """peft's ``merge_and_unload``: fold every open adapter into its weight (``W ← W + c·B A``) and
    give back the plain model, in place: each :class:`FusedKeepLoRALinear` becomes the linear it
    wrapped (same class, same weight and bias storage), each :class:`SplitMultiheadAttention` is
    re-packed into ``nn.MultiheadAttention``. The outputs equal the wrapped model's (to rounding of
    the merge in the weight's dtype) and the state dict loads into a freshly built stock model with
    ``strict=True``. The bases and adapters are dropped (save the controller first to continue
    the sequence). Returns ``model``; a wrapped root module is replaced and the new one returned."""
    if isinstance(model, FusedKeepLoRALinear):
        return model.to_linear()
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedKeepLoRALinear):
            replace_module(model, name, module.to_linear())
    if isinstance(model, SplitMultiheadAttention):
        return model.to_multihead_attention()
    for name, module in list(model.named_modules()):
        if isinstance(module, SplitMultiheadAttention):
            replace_module(model, name, module.to_multihead_attention())
    return model
