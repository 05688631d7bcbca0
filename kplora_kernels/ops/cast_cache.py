"""Bases in the compute dtype once per task, not once per call.

A projection multiplies the gradient by its bases in the gradient's dtype; casting an fp32 basis to
bf16 on every call moves more bytes than the gradient itself at 7B. :func:`as_compute` keeps the cast
copy keyed on the basis tensor's identity and its version counter (``t._version`` changes on every
in-place write; ``set_bases`` installs a new tensor): a basis is cast once per (tensor, version,
dtype), and the copy dies with the basis (a weak reference drops the entry).
"""
from __future__ import annotations

import weakref

import torch

_CACHE: dict[int, tuple] = {}  # id(basis) -> (weakref to it, version, {dtype: cast contiguous copy})


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: never cached
        return None


def as_compute(B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``B`` (a basis, ``n×k``) as a contiguous tensor of ``dtype``: ``B`` itself when it already is,
    else a cast copy made once per version of ``B`` (see the module doc). Tensors that autograd
    tracks, tensor subclasses and inference tensors are cast every time (nothing to key on safely)."""
    if B.dtype == dtype and B.is_contiguous():
        return B
    version = _version(B)
    if type(B) is not torch.Tensor or B.requires_grad or version is None or torch.compiler.is_compiling():
        return B.to(dtype).contiguous()
    key = id(B)
    entry = _CACHE.get(key)
    if entry is None or entry[0]() is not B or entry[1] != version:
        entry = (weakref.ref(B, lambda _, key=key: _CACHE.pop(key, None)), version, {})
        _CACHE[key] = entry
    copies = entry[2]
    if dtype not in copies:
        copies[dtype] = B.detach().to(dtype).contiguous()
    return copies[dtype]


def clear() -> None:
    """Drop every cached copy (tests; memory pressure)."""
    _CACHE.clear()
