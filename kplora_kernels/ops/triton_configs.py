"""Which launch configurations the Triton kernels may use on which GPU: the one table that the
launchers prune with and that ``kplora kernels`` (:mod:`kplora_kernels.kernel_report`) compiles.

A GPU is reduced to its *arch class* (:func:`arch_class`): 80 (A100, 166,912 B of opt-in shared
memory per block), 86/89 (RTX 3090/4090, L40: 101,376 B) or 90 (H100/H200: 232,448 B). Per kernel,
dtype and shape class the candidates are filtered by a shared-memory model (bytes of the tiles the
software pipeline keeps in flight plus the operands staged for ``tl.dot``) against the class's
limit. The model over-estimates (it counts every pipeline stage of every loop; Triton stages less)
and only selects; it is validated, not trusted: the report compiles every surviving config for every
class with Triton's compiler and checks the real shared memory, and that bf16/fp16 kernels spill
nothing and fp32 ones at most 1 KiB per thread (register tiles chosen small enough for that).
"""
from __future__ import annotations

import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block, opt-in
STACK_LIMIT = {"fp32": 1024, "fp16": 0, "bf16": 0}  # bytes of local memory per thread
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
DTYPE_NAMES = {0: "fp32", 1: "fp16", 2: "bf16"}  # the kernels' element codes
MAX_CONFIGS = 2  # autotuned per launch key: the first that fit, in the table's order of preference
RANK_BUCKETS = (16, 32, 64, 128)  # padded basis widths of the fused kernels (up to FUSED_MAX_K)
# (KP, LP) classes of the sketch kernel, LP = 0 one-sided; two-sided l = 2k + 1, so L ≤ 4·KP (≤ 256)
SKETCH_CASES = ((16, 0), (32, 0), (64, 0), (128, 0), (16, 64), (32, 128), (64, 256), (128, 256))


def device_arch(device=None) -> "tuple[int | None, str | None]":
    """``(arch class, None)`` of a CUDA device: the known class with the largest shared-memory limit
    that the device's own opt-in limit reaches (a newer GPU is treated as the class it matches); or
    ``(None, reason)`` for a device below every class (older than sm_80)."""
    import torch

    props = torch.cuda.get_device_properties(device)
    limit = props.shared_memory_per_block_optin
    fitting = [a for a in (90, 80, 86) if SHARED_LIMIT[a] <= limit]
    if not fitting:
        return None, (f"the Triton kernels' launch tables need {min(SHARED_LIMIT.values())} B of shared memory "
                      f"per block (sm_80 and newer), {props.name} offers {limit} B")
    return fitting[0], None


def arch_class(device=None) -> int:
    """The arch class of a CUDA device (see :func:`device_arch`).

    Raises:
        RuntimeError: the device offers less shared memory per block than every known class
            (older than sm_80).
    """
    arch, reason = device_arch(device)
    if arch is None:
        raise RuntimeError(reason)
    return arch


def pow2(k: int) -> int:
    """The padded width (≥ 16, a power of two) a kernel keeps for ``k`` basis/sketch columns."""
    return max(16, 1 << (max(k, 1) - 1).bit_length())


# --- candidates and the shared-memory model ------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) in order of preference; BLOCK_K is the epilogue's k step
# (32). Register rules, measured with the report (each broken rule spilled there):
# - two-sided rows keep BLOCK_M = 16 (U and the fp32 P tiles beside Q), half ones with 8 warps at
#   16×64 (4 warps spill on sm_80/90 at K = 128); 32-row half blocks take 8 warps (sm_90, restore);
# - the fp32 column pass keeps BLOCK_M = 32 (ptxas for sm_80 spills kilobytes at 64), the half one
#   runs 8 warps (its KU×BLOCK_N fp32 accumulator and offset tile spill 4 warps at KU = 128);
# - the epilogue's tiles stay at 64×64 per 4 warps (int64 addresses of a 128×128 tile and its fp32
#   accumulator spill 8 warps).
_ROWS = {("fp32", False): [(16, 32, 4, 2), (32, 32, 4, 2)], ("fp32", True): [(16, 32, 4, 2), (16, 32, 8, 2)],
         ("half", False): [(16, 64, 4, 2), (32, 64, 8, 3), (16, 32, 4, 2)],
         ("half", True): [(16, 64, 8, 2), (16, 32, 4, 2)]}
_COLS = {"fp32": [(32, 32, 4, 2), (32, 64, 4, 2)], "half": [(64, 64, 8, 3), (32, 64, 8, 2)]}
_EPILOGUE = {"fp32": [(64, 64, 4, 2), (32, 64, 4, 2)], "half": [(64, 64, 4, 3), (64, 128, 8, 3)]}
_SKETCH_T = 32  # token tile of the sketch kernel


def _model_rows(cfg, e, kvp, kup):
    bm, bn, _, s = cfg
    loop1 = s * (bm * bn + bn * kvp) * e
    loop2 = s * (bm * bn + kvp * bn) * e + (s * kup * bn * 4 if kup else 0) + bm * kvp * e
    fixed = (kup * kvp + bm * kup) * 4 if kup else 0  # U_blk (P V) before sweep 2, staged in fp32
    return max(loop1, loop2, fixed)  # the phases reuse one another's buffers


def _model_cols(cfg, e, kup):
    bm, bn, _, s = cfg
    return s * (kup * bm + bm * bn) * e


def _model_epilogue(cfg, e):
    bm, bn, _, s = cfg
    return s * (bm + bn) * 32 * 4  # L and R tiles are upcast to fp32 before the dot


def _select(candidates, model, limit, what):
    """Candidates whose modelled shared memory fits ``limit``; a table without any is a bug, reported
    with ``what`` (the kernel kind, arch, dtype and widths)."""
    fitting = [c for c in candidates if model(c) <= limit][:MAX_CONFIGS]
    if not fitting:
        raise RuntimeError(f"no launch configuration of the {what} fits {limit} B of shared memory")
    return fitting


def configs(kind: str, arch: int, dtype: str, KVP: int = 16, KUP: int = 0) -> list:
    """The ``triton.Config`` list a launcher autotunes over for ``kind`` (``"rows"``, ``"cols"``,
    ``"epilogue"``) on arch class ``arch`` in ``dtype`` (``"fp32"|"fp16"|"bf16"``); ``KVP``/``KUP``
    the padded basis widths (``KUP`` 0 for one-sided rows). Under the interpreter: one config.

    Raises:
        RuntimeError: no candidate of the table fits the arch class's shared memory at these widths.
        KeyError: an unknown ``kind``, ``arch`` or ``dtype``.
    """
    import triton  # here, not at import: the tables and the report's options need no Triton

    if INTERPRET:  # the interpreter takes one config and no benchmarking (docs/design.md §3)
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16})]
    fp32 = dtype == "fp32"
    e = ELEMENT_BYTES[dtype]
    limit = SHARED_LIMIT[arch]
    family = "fp32" if fp32 else "half"
    table = _ROWS[family, KUP > 0] if kind == "rows" else {"cols": _COLS, "epilogue": _EPILOGUE}[kind][family]
    model = {"rows": lambda c: _model_rows(c, e, KVP, KUP), "cols": lambda c: _model_cols(c, e, KUP),
             "epilogue": lambda c: _model_epilogue(c, e)}[kind]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 32}, num_warps=w, num_stages=s)
            for bm, bn, w, s in _select(table, model, limit, f"{kind} kernel on arch {arch} in {dtype} "
                                                             f"(KVP={KVP}, KUP={KUP})")]


def sketch_config(arch: int, dtype: str, KP: int, LP: int) -> dict:
    """Block sizes of the sketch kernel for sketch widths ``KP``/``LP`` (padded; ``LP`` 0 one-sided):
    ``BLOCK_T`` tokens per program, ``BLOCK_D`` features per step, warps and stages, chosen so the
    staged tiles (``BLOCK_T×BLOCK_D`` of the inputs, ``BLOCK_D×KP`` and ``BLOCK_D×LP`` of the test
    matrices, fp32 for fp32 inputs) fit the arch class's shared memory.

    Raises:
        RuntimeError: no block sizes fit the arch class's shared memory at these widths.
        KeyError: an unknown ``arch`` or ``dtype``.
    """
    if INTERPRET:
        return {"BLOCK_T": 16, "BLOCK_D": 32, "num_warps": 4, "num_stages": 1}
    e = ELEMENT_BYTES[dtype]
    width = max(KP, min(4 * KP, 256) if LP else 0)  # the widest L of this K's class: l = 2k + 1 ≤ 4·KP
    # fp16 upcasts its input tiles to fp32 (its P/Q stay fp32): 64-wide feature steps spill there
    for bd, stages in ((64, 2), (32, 2), (32, 1), (16, 1))[dtype == "fp16":]:
        staged = stages * (_SKETCH_T * bd + bd * width) * e + _SKETCH_T * width * e
        if staged <= SHARED_LIMIT[arch]:
            # 8 warps where the fp32 P and Q tiles (BLOCK_T×(KP+LP)) would spill 4: wide sketches, and
            # fp16, whose P/Q stay fp32 and whose input tiles are upcast (measured with the report)
            warps = 8 if width >= 128 or dtype == "fp16" else 4
            return {"BLOCK_T": _SKETCH_T, "BLOCK_D": bd, "num_warps": warps, "num_stages": stages}
    raise RuntimeError(f"no launch configuration of the sketch kernel on arch {arch} in {dtype} (KP={KP}, "
                       f"LP={LP}) fits {SHARED_LIMIT[arch]} B of shared memory")


def early_prune(kind: str):
    """An ``early_config_prune`` for ``triton.autotune``: keeps the candidates of :func:`configs` for
    the launching device's arch class, the launch's dtype and its padded widths."""
    def prune(candidates, named_args, **kwargs):
        arch = arch_class(named_args["Gp"].device)
        allowed = {_shape(c) for c in configs(kind, arch, DTYPE_NAMES[kwargs["DT"]], **widths(kind, kwargs))}
        kept = [c for c in candidates if _shape(c) in allowed]
        if not kept:  # all_candidates() holds every table entry: an empty set means the tables disagree
            raise RuntimeError(f"{kind}: none of the autotuner's configs is in the table for arch {arch}")
        return kept
    return prune


def widths(kind: str, constexprs: dict) -> dict:
    """The padded widths of a launch (its constexprs) that :func:`configs` takes for ``kind``."""
    if kind == "rows":
        return {"KVP": constexprs["KVP"], "KUP": constexprs["KUP"] if constexprs["HAS_U"] else 0}
    if kind == "cols":
        return {"KUP": constexprs["KUP"]}
    return {}


def _shape(c) -> tuple:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def all_candidates(kind: str) -> list:
    """Every config any arch class may launch for ``kind`` (what the autotuner is built with)."""
    import triton

    if INTERPRET:
        return configs(kind, 90, "fp32")
    shapes = dict.fromkeys(c for table in {"rows": _ROWS, "cols": _COLS, "epilogue": _EPILOGUE}[kind].values()
                           for c in table)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 32}, num_warps=w, num_stages=s)
            for bm, bn, w, s in shapes]
