"""``kplora kernels``: compile every Triton kernel of the package for real NVIDIA targets, no GPU.

Each entry is one (kernel, arch, dtype, case, config) compiled with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)``; ``shared_bytes`` is the dynamic shared memory of the compiled
kernel, ``registers``/``stack_bytes`` come from ``cuobjdump --dump-resource-usage`` on its cubin,
``limit_bytes`` is the opt-in shared memory per block of the arch and ``fits`` says whether the
entry launches there (shared ≤ limit; no stack for bf16/fp16, ≤ 1 KiB for fp32).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block, opt-in
DTYPES = {"fp32": 0, "fp16": 1, "bf16": 2}
STACK_LIMIT = {"fp32": 1024, "fp16": 0, "bf16": 0}  # bytes of local memory per thread


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    reg = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return int(reg.group(1)) if reg else 0, int(stack.group(1)) if stack else 0


def _signature(fn, pointers: dict, constexprs: dict) -> dict:
    """Triton type strings for the arguments of ``fn``: ``pointers`` name → type, the rest i32."""
    return {n: ("constexpr" if n in constexprs else pointers.get(n, "i32")) for n in fn.arg_names}


def cases():
    """(kernel name, jit fn, case, pointer types, constexprs without the dtype, configs)."""
    from .ops import sketch_triton as st
    from .ops import triton_kernels as tk

    rows_ptr = {n: "*i64" for n in ("Gp", "Op", "Vp", "Q0p", "Up", "Pp", "Wp")} | {"S": "*fp32"}
    for kvp, kup in ((16, 0), (64, 0), (128, 0), (16, 128), (128, 128)):
        case = f"rows KVP={kvp} KUP={max(kup, 16)}" + (" two-sided" if kup else "")
        ce = dict(KVP=kvp, KUP=max(kup, 16), HAS_Q0=False, HAS_U=bool(kup), UPCAST=False)
        yield "kplora_kernels.ops.triton_kernels:_rows_kernel_fn", tk.KERNELS["rows"].fn, case, rows_ptr, ce, \
            tk._configs("rows")
    cols_ptr = {n: "*i64" for n in ("Gp", "Op", "Up", "P0p")}
    for kup in (16, 64, 128):
        yield "kplora_kernels.ops.triton_kernels:_cols_kernel_fn", tk.KERNELS["cols"].fn, f"cols KUP={kup}", \
            cols_ptr, dict(KUP=kup, HAS_P0=False, UPCAST=False), tk._configs("cols")
    epi_ptr = {n: "*i64" for n in ("Gp", "Op", "Lp", "Rp")} | {"S": "*fp32"}
    yield "kplora_kernels.ops.triton_kernels:_epilogue_kernel_fn", tk.KERNELS["epilogue"].fn, "epilogue", \
        epi_ptr, dict(KEEP=True), tk._configs("epilogue")
    sk_ptr = {"M1": None, "M2": None, "A": None, "B": None, "ACC1": "*fp32", "ACC2": "*fp32", "PROBE": "*fp32"}
    for kp in (32, 64, 128):
        yield "kplora_kernels.ops.sketch_triton:_sketch_update_kernel", st._sketch_update_kernel.fn, \
            f"sketch KP={kp} LP={2 * kp} two", sk_ptr, dict(TWO=True, UPCAST=False, KP=kp, LP=2 * kp), None


def compile_entry(kernel: str, arch: int, dtype: str, case: str, signature: dict, constexprs: dict,
                  num_warps: int, num_stages: int) -> dict:
    """Compile one entry and measure it; ``kernel`` is ``"module:function"`` (a ``@triton.jit`` or
    its plain function). Raises whatever ``triton.compile`` raises on a kernel that does not build."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod, name = kernel.split(":")
    fn = getattr(importlib.import_module(mod), name)
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        from .ops import triton_kernels as tk

        fn = {tk._rows_kernel_fn: tk.KERNELS["rows"].fn, tk._cols_kernel_fn: tk.KERNELS["cols"].fn,
              tk._epilogue_kernel_fn: tk.KERNELS["epilogue"].fn}[fn]
    k = triton.compile(ASTSource(fn, dict(signature), dict(constexprs)), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    reg, stack = resource_usage(k.asm["cubin"])
    shared = int(k.metadata.shared)
    return dict(kernel=kernel, arch=arch, dtype=dtype, case=case, signature=dict(signature),
                constexprs=dict(constexprs), num_warps=num_warps, num_stages=num_stages, shared_bytes=shared,
                registers=reg, stack_bytes=stack, limit_bytes=SHARED_LIMIT[arch],
                fits=shared <= SHARED_LIMIT[arch] and stack <= STACK_LIMIT[dtype])


def report(arches=None, dtypes=None):
    """Every entry for the arches and dtype names given (default all), as dicts (see module doc)."""
    from .ops import sketch_triton as st

    tname = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
    out = []
    for arch in arches or sorted(SHARED_LIMIT):
        for dtype in dtypes or list(DTYPES):
            code = DTYPES[dtype]
            for kernel, fn, case, ptrs, ce, configs in cases():
                ptrs = {n: (t or f"*{tname[dtype]}") for n, t in ptrs.items()}
                if configs is None:  # the sketch kernel: its fixed heuristic blocks
                    h = st.heuristics(64)
                    ce = ce | dict(IEEE=dtype == "fp32", WIDE2=dtype == "fp16", BLOCK_T=h["BLOCK_T"],
                                   BLOCK_D=h["BLOCK_D"])
                    runs = [(ce, h["num_warps"], 3)]
                else:
                    base = ce | dict(DT=code, IEEE=dtype == "fp32")
                    if "epilogue" in case:
                        base["LT"] = code
                    runs = [(base | c.kwargs, c.num_warps, c.num_stages) for c in configs]
                for cex, w, s in runs:
                    sig = _signature(fn, ptrs, cex)
                    out.append(compile_entry(kernel, arch, dtype, case, sig, cex, w, s))
    return out


def run(args) -> int:
    entries = report([int(a) for a in args.arch] if args.arch else None, args.dtype or None)
    print(f"{'kernel':<22}{'arch':>5} {'dtype':<5} {'case':<28}{'config':<28}{'shared':>8}{'reg':>5}"
          f"{'stack':>7} fits")
    for e in entries:
        c = e["constexprs"]
        cfg = (f"{c.get('BLOCK_M', c.get('BLOCK_T'))}x{c.get('BLOCK_N', c.get('BLOCK_D'))} "
               f"w{e['num_warps']} s{e['num_stages']}")
        print(f"{e['kernel'].split(':')[1]:<22}{e['arch']:>5} {e['dtype']:<5} {e['case']:<28}{cfg:<28}"
              f"{e['shared_bytes']:>8}{e['registers']:>5}{e['stack_bytes']:>7} {e['fits']}")
    print(f"{len(entries)} entries, {sum(e['fits'] for e in entries)} fit, "
          f"max stack {max((e['stack_bytes'] for e in entries), default=0)} B")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(entries, f, indent=1)
    return 0


def add_arguments(p) -> None:
    p.add_argument("--json", help="write the entries as a JSON list to this path")
    p.add_argument("--arch", action="append", choices=[str(a) for a in SHARED_LIMIT], help="only this arch")
    p.add_argument("--dtype", action="append", choices=list(DTYPES), help="only this dtype")
    p.set_defaults(func=run)
