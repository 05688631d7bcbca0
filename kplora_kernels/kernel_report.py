"""``kplora kernels``: compile every Triton kernel of the package for real NVIDIA targets, no GPU.

Each entry is one (kernel, arch, dtype, case, config) compiled with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)``: the four kernels (rows, cols, epilogue, sketch) × sm_80/86/89/90 ×
bf16/fp16/fp32 × the shape classes the launchers use (:func:`cases`) × exactly the configs the
launcher keeps there after its pruning (:mod:`kplora_kernels.ops.triton_configs`).
``shared_bytes`` is the dynamic shared memory of the compiled kernel, ``registers``/``stack_bytes``
come from ``cuobjdump --dump-resource-usage`` on its cubin, ``limit_bytes`` is the opt-in shared
memory per block of the arch and ``fits`` says whether the entry launches there without spilling
(shared ≤ limit; no stack for bf16/fp16, ≤ 1 KiB for fp32). ``--json`` writes the entries (keys
``kernel`` "module:function", ``arch``, ``dtype``, ``case``, ``signature``, ``constexprs``,
``num_warps``, ``num_stages``, ``shared_bytes``, ``registers``, ``stack_bytes``, ``limit_bytes``,
``fits``): ``triton.compile(ASTSource(fn, signature + constexprs, constexprs), GPUTarget(...))``
reproduces any of them (unit strides are constexprs, as the JIT specialises an int 1; the JIT's
divisibility-by-16 hints are not applied). Exit status 1 when an entry does not fit. Must run without
``TRITON_INTERPRET`` (the full matrix: ~500 compiles, ~12 minutes on 2 cores with ``--jobs 2``).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

from .config_file import ConfigError
from .ops.triton_configs import DTYPE_NAMES, RANK_BUCKETS, SHARED_LIMIT, SKETCH_CASES, STACK_LIMIT

DTYPES = {name: code for code, name in DTYPE_NAMES.items()}
TK, ST = "kplora_kernels.ops.triton_kernels", "kplora_kernels.ops.sketch_triton"
KERNEL_NAMES = {"rows": f"{TK}:_rows_kernel", "cols": f"{TK}:_cols_kernel", "epilogue": f"{TK}:_epilogue_kernel",
                "sketch": f"{ST}:_sketch_update_kernel"}
# unit strides of the contiguous operands the launchers pass: Triton specialises an int 1 as a constant
_UNIT = {"rows": ("stride_gn", "stride_on", "stride_vk", "stride_qk", "stride_uk", "stride_pn"),
         "cols": ("stride_gn", "stride_uk", "stride_pn"),
         "epilogue": ("stride_gn", "stride_on", "stride_lk", "stride_rn"),
         "sketch": ("s_ad", "s_bd", "s_m1k", "s_m2l", "s_c1k", "s_c2l")}


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = _cuobjdump()
        if not os.access(tool, os.X_OK):
            raise ConfigError(f"kplora kernels reads registers and stack with cuobjdump, expected at {tool} (the "
                              "triton wheel's NVIDIA backend); it is missing or not executable")
        done = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigError(f"cuobjdump failed on a compiled kernel (exit {done.returncode}): "
                              f"{done.stderr.strip()[-300:]}")
        out = done.stdout
    reg = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return int(reg.group(1)) if reg else 0, int(stack.group(1)) if stack else 0


def _signature(fn, pointers: dict, constexprs: dict) -> dict:
    """Triton type strings of the non-constexpr arguments of ``fn``: ``pointers`` name → type, the rest i32."""
    return {n: pointers.get(n, "i32") for n in fn.arg_names if n not in constexprs}


def cases():
    """``(kind, case, constexprs without dtype or config)`` for every shape class the launchers use:
    the rank buckets up to ``FUSED_MAX_K`` one- and two-sided (two-sided pads both bases to one
    bucket), the restore's offsets at the widest bucket, the column pass per bucket, the epilogue
    (keep, complement, fp32 factors), and the sketch widths of :data:`SKETCH_CASES`."""
    for kvp in RANK_BUCKETS:
        yield "rows", f"one-sided KV<={kvp}", dict(KVP=kvp, KUP=16, HAS_Q0=False, HAS_U=False)
        yield "rows", f"two-sided K<={kvp}", dict(KVP=kvp, KUP=kvp, HAS_Q0=True, HAS_U=True)
    top = RANK_BUCKETS[-1]  # the two-sided launch always has the offset U (P V): the restore adds nothing
    yield "rows", f"restore one-sided KV<={top}", dict(KVP=top, KUP=16, HAS_Q0=True, HAS_U=False)
    for kup in RANK_BUCKETS:
        yield "cols", f"pass 1 KU<={kup}", dict(KUP=kup, HAS_P0=False)
    yield "cols", f"restore pass 1 KU<={top}", dict(KUP=top, HAS_P0=True)
    yield "epilogue", "general", dict(KEEP=True)
    yield "epilogue", "complement", dict(KEEP=False)
    yield "epilogue", "general fp32 factors", dict(KEEP=True, LT=0)  # half G with offsets or row shards
    yield "epilogue", "complement fp32 factors", dict(KEEP=False, LT=0)  # half G, complement, row shards
    for kp, lp in SKETCH_CASES:
        name = f"sketch K<={kp}" + (f" L<={lp}" if lp else " one-sided")
        yield "sketch", name, dict(TWO=bool(lp), KP=kp, LP=lp or 16)


def _pointers(kind: str, dtype: str) -> dict:
    if kind == "sketch":
        return {n: f"*{dtype}" for n in ("A", "B", "M1", "M2")} | {n: "*fp32" for n in ("ACC1", "ACC2", "PROBE")}
    arrays = {"rows": ("Gp", "Op", "Vp", "Q0p", "Up", "Pp"), "cols": ("Gp", "Op", "Up", "P0p"),
              "epilogue": ("Gp", "Op", "Lp", "Rp")}[kind]
    return {n: "*i64" for n in arrays} | ({"S": "*fp32"} if kind != "cols" else {})


def launches(kind: str, arch: int, dtype: str, ce: dict):
    """``(constexprs, num_warps, num_stages)`` of every config the launcher may run for this case on
    this arch class: the table after its pruning (:mod:`kplora_kernels.ops.triton_configs`)."""
    from .ops import triton_configs as tc

    code = DTYPES[dtype]
    unit = dict.fromkeys(_UNIT[kind], 1)
    if kind == "sketch":
        c = tc.sketch_config(arch, dtype, ce["KP"], ce["LP"] if ce["TWO"] else 0)
        yield ce | unit | dict(UPCAST=False, IEEE=dtype == "fp32", WIDE2=dtype == "fp16", BLOCK_T=c["BLOCK_T"],
                               BLOCK_D=c["BLOCK_D"]), c["num_warps"], c["num_stages"]
        return
    base = dict(DT=code, IEEE=dtype == "fp32") | ce | unit | dict(UPCAST=False)
    if kind == "epilogue":
        base = dict(LT=code) | base | dict(KB=256)
        if base["LT"] == code and "LT" in ce:  # fp32 factors are a half-precision case only
            return
    for c in tc.configs(kind, arch, dtype, **tc.widths(kind, base)):
        yield base | c.kwargs, c.num_warps, c.num_stages


def jit_function(kernel: str):
    """The ``@triton.jit`` function named ``"module:function"``."""
    import importlib

    mod, name = kernel.split(":")
    return getattr(importlib.import_module(mod), name)


def compile_entry(kernel: str, arch: int, dtype: str, case: str, signature: dict, constexprs: dict,
                  num_warps: int, num_stages: int) -> dict:
    """Compile one entry with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` and measure it;
    ``kernel`` is ``"module:function"``, ``signature`` the non-constexpr arguments' Triton types.
    Raises whatever ``triton.compile`` raises on a kernel that does not build."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit_function(kernel)
    full = {n: (signature[n] if n in signature else "constexpr") for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, full, dict(constexprs)), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    reg, stack = resource_usage(k.asm["cubin"])
    shared = int(k.metadata.shared)
    return dict(kernel=kernel, arch=arch, dtype=dtype, case=case, signature=dict(signature),
                constexprs=dict(constexprs), num_warps=num_warps, num_stages=num_stages, shared_bytes=shared,
                registers=reg, stack_bytes=stack, limit_bytes=SHARED_LIMIT[arch],
                fits=shared <= SHARED_LIMIT[arch] and stack <= STACK_LIMIT[dtype])


def plan(arches=None, dtypes=None, kinds=None, case_contains=None) -> list[dict]:
    """The entries to compile (arguments of :func:`compile_entry`) for the arches, dtype names,
    kernel kinds (``rows``, ``cols``, ``epilogue``, ``sketch``) and case substring given (None: all)."""
    out = []
    for arch in arches or sorted(SHARED_LIMIT):
        for dtype in dtypes or list(DTYPES):
            for kind, case, ce in cases():
                if (kinds and kind not in kinds) or (case_contains and case_contains not in case):
                    continue
                fn = jit_function(KERNEL_NAMES[kind])
                for cex, w, st in launches(kind, arch, dtype, ce):
                    out.append(dict(kernel=KERNEL_NAMES[kind], arch=arch, dtype=dtype, case=case,
                                    signature=_signature(fn, _pointers(kind, dtype), cex), constexprs=cex,
                                    num_warps=w, num_stages=st))
    return out


def _compile_kw(kw):
    return compile_entry(**kw)


def report(arches=None, dtypes=None, kinds=None, case_contains=None, jobs=1) -> list[dict]:
    """Every entry of :func:`plan`, compiled and measured (see the module doc), in plan order;
    ``jobs`` > 1 compiles in that many processes."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ConfigError("kplora kernels compiles the real kernels: unset TRITON_INTERPRET (with it set, "
                          "@triton.jit gives interpreted functions that triton.compile cannot take)")
    todo = plan(arches, dtypes, kinds, case_contains)
    if jobs <= 1:
        return [compile_entry(**kw) for kw in todo]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_kw, todo))


def _config(e) -> str:
    c = e["constexprs"]
    return (f"{c.get('BLOCK_M', c.get('BLOCK_T'))}x{c.get('BLOCK_N', c.get('BLOCK_D'))} "
            f"w{e['num_warps']} s{e['num_stages']}")


def summary(entries) -> list[str]:
    """Lines: entries and fits in all, then per arch the largest shared memory and stack."""
    lines = [f"{len(entries)} entries, {sum(e['fits'] for e in entries)} fit, "
             f"max stack {max((e['stack_bytes'] for e in entries), default=0)} B"]
    for arch in sorted({e["arch"] for e in entries}):
        mine = [e for e in entries if e["arch"] == arch]
        top = max(mine, key=lambda e: e["shared_bytes"])
        lines.append(f"sm_{arch}: {len(mine)} entries, {sum(e['fits'] for e in mine)} fit, max shared "
                     f"{top['shared_bytes']} B of {SHARED_LIMIT[arch]} ({top['kernel'].split(':')[1]} {top['dtype']} "
                     f"{top['case']}), max stack {max(e['stack_bytes'] for e in mine)} B")
    return lines


def run(args) -> int:
    """``kplora kernels``: print the table (and write ``--json``); exit status 1 when an entry does not fit."""
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be ≥ 1, got {args.jobs}")
    entries = report([int(a) for a in args.arch] if args.arch else None, args.dtype or None,
                     args.kernel or None, args.case, args.jobs or os.cpu_count() or 1)
    print(f"{'kernel':<22}{'arch':>5} {'dtype':<5} {'case':<28}{'config':<16}{'shared':>8}{'reg':>5}"
          f"{'stack':>7} fits")
    for e in entries:
        print(f"{e['kernel'].split(':')[1]:<22}{e['arch']:>5} {e['dtype']:<5} {e['case']:<28}{_config(e):<16}"
              f"{e['shared_bytes']:>8}{e['registers']:>5}{e['stack_bytes']:>7} {e['fits']}")
    print("\n".join(summary(entries)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(entries, f, indent=1)
    return 0 if all(e["fits"] for e in entries) else 1


def add_arguments(p) -> None:
    p.add_argument("--json", help="write the entries as a JSON list to this path")
    p.add_argument("--arch", action="append", choices=[str(a) for a in SHARED_LIMIT], help="only this arch")
    p.add_argument("--dtype", action="append", choices=list(DTYPES), help="only this dtype")
    p.add_argument("--kernel", action="append", choices=list(KERNEL_NAMES), help="only this kernel")
    p.add_argument("--case", help="only cases whose name contains this text")
    p.add_argument("--jobs", type=int, help="compile in this many processes (default: the CPU count)")
