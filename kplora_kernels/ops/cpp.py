"""Loads the C++ CPU kernels (``torch.ops.kplora.*``): the ahead-of-time build ``kplora_kernels._C``
from ``setup.py``, or, when asked for explicitly, a JIT build with ninja (about 30 s, then cached)."""
from __future__ import annotations

import torch

_loaded = False
_errors: list[str] = []


def _register_fakes() -> None:
    """Shape-only implementations so ``torch.compile(fullgraph=True)`` traces calls to the ops."""
    @torch.library.register_fake("kplora::residual_project")
    def _(G, U, V, scale):
        return torch.empty_like(G, memory_format=torch.contiguous_format)

    @torch.library.register_fake("kplora::residual_project_out")
    def _(G, U, V, scale, *, out):
        return None

    @torch.library.register_fake("kplora::residual_project_")
    def _(G, U, V, scale):
        return None

    @torch.library.register_fake("kplora::residual_project_grouped_")
    def _(Gs, Us, Vs, scales):
        return None

    @torch.library.register_fake("kplora::subspace_restore_")
    def _(W, U, V, W0V, UtW0):
        return None

    @torch.library.register_fake("kplora::subspace_restore_grouped_")
    def _(Ws, Us, Vs, W0Vs, UtW0s):
        return None

    @torch.library.register_fake("kplora::project_rows")
    def _(X, V, scale):
        return torch.empty_like(X, memory_format=torch.contiguous_format)


def load(jit: bool = False) -> bool:
    """Make the ops available; returns whether they are. ``jit=True`` compiles them when the
    ahead-of-time build is missing. Failures are kept for :func:`unavailable_reason`."""
    global _loaded
    if _loaded:
        return True
    try:
        import kplora_kernels._C  # noqa: F401  (registers the ops)
    except ImportError as exc:
        _errors.append(f"ahead-of-time build not importable ({exc})")
        if not jit:
            return False
        try:
            from torch.utils.cpp_extension import load as jit_load

            from .cpp_build import CXX_FLAGS, LD_FLAGS, SOURCES

            jit_load(name="kplora_kernels_jit", sources=SOURCES, extra_cflags=CXX_FLAGS,
                     extra_ldflags=LD_FLAGS, verbose=False)
        except Exception as jit_exc:  # compiler or ninja missing, build error
            _errors.append(f"JIT build failed ({jit_exc})")
            return False
    _register_fakes()
    _loaded = True
    return True


def unavailable_reason() -> str:
    return "; ".join(_errors) or "not loaded yet"
