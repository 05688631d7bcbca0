"""``kplora kernels`` (kplora_kernels.kernel_report): the plan covers every Triton kernel × arch ×
dtype with exactly the configs the launchers' pruning keeps; a small subset compiles for sm_86
(Triton's compiler and ptxas, no GPU, in a process without the interpreter), fits, and recompiles
from its JSON alone, independently, to the same shared memory; a config too large is flagged.
The full matrix is one command (``kplora kernels --json R``, bench/README.md).
"""
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
from kplora_kernels.config_file import ConfigError  # noqa: E402
from kplora_kernels import kernel_report as kr  # noqa: E402
from kplora_kernels.ops import triton_configs as tc  # noqa: E402
from kplora_kernels.ops import triton_kernels as tk  # noqa: E402

KEYS = {"kernel", "arch", "dtype", "case", "signature", "constexprs", "num_warps", "num_stages", "shared_bytes",
        "registers", "stack_bytes", "limit_bytes", "fits"}


@pytest.fixture
def gpu_tables(monkeypatch):
    """The GPU tables, not the interpreter's single config (conftest sets TRITON_INTERPRET=1)."""
    monkeypatch.setattr(tc, "INTERPRET", False)


def test_plan_covers_every_kernel_arch_and_dtype(gpu_tables):
    plan = kr.plan()
    assert {(e["kernel"], e["arch"], e["dtype"]) for e in plan} == {
        (k, a, d) for k in kr.KERNEL_NAMES.values() for a in (80, 86, 89, 90) for d in ("bf16", "fp16", "fp32")}
    for e in plan:
        params = inspect.signature(kr.jit_function(e["kernel"]).fn).parameters
        assert set(e["signature"]) | set(e["constexprs"]) == set(params)
    cases = {e["case"] for e in plan}
    assert {f"two-sided K<={k}" for k in tc.RANK_BUCKETS} <= cases and "sketch K<=128 L<=256" in cases


@pytest.mark.parametrize("arch", [86, 90])
def test_report_lists_exactly_what_the_autotuner_keeps(gpu_tables, monkeypatch, arch):
    """The launcher's early_config_prune on a device of this arch class keeps the report's configs."""
    monkeypatch.setattr(tc, "arch_class", lambda device=None: arch)
    kernels = {kind: triton.autotune(configs=tc.all_candidates(kind), key=["N"],
                                     prune_configs_by={"early_config_prune": tc.early_prune(kind)})(fn)
               for kind, fn in (("rows", tk._rows_kernel), ("cols", tk._cols_kernel),
                                ("epilogue", tk._epilogue_kernel))}
    for kernel in kernels.values():
        kernel.nargs = {"Gp": torch.empty(1, dtype=torch.int64)}  # what early_config_prune reads
    seen = 0
    for e in kr.plan([arch], None, ["rows", "cols", "epilogue"]):
        kind = e["kernel"].split(":_")[1].replace("_kernel", "")
        ce = e["constexprs"]
        kept = kernels[kind].prune_configs({k: v for k, v in ce.items() if not k.startswith("BLOCK")})
        shapes = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
        assert (ce["BLOCK_M"], ce["BLOCK_N"], e["num_warps"], e["num_stages"]) in shapes
        mine = [x for x in kr.plan([arch], [e["dtype"]], [kind]) if x["case"] == e["case"]]
        assert len(mine) == len(kept), (e["case"], e["dtype"])
        seen += 1
    assert seen > 0


# Compiling needs the real @triton.jit functions: run without the interpreter the test session sets.
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

RECOMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
e = json.load(open(sys.argv[1]))[0]
module, name = e["kernel"].split(":")
fn = getattr(importlib.import_module(module), name)
sig = {n: e["signature"].get(n, "constexpr") for n in fn.arg_names}
k = triton.compile(ASTSource(fn, sig, e["constexprs"]), target=GPUTarget("cuda", e["arch"], 32),
                   options={"num_warps": e["num_warps"], "num_stages": e["num_stages"]})
print(k.metadata.shared)
"""


def test_a_subset_compiles_fits_and_recompiles_from_json(gpu_tables, tmp_path):
    """``kplora kernels`` for one arch, dtype and case writes entries that fit; an independent
    ``triton.compile`` of the first, from its JSON alone and with a fresh cache, gives its shared bytes."""
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, "-m", "kplora_kernels", "kernels", "--arch", "86", "--dtype", "bf16",
                          "--kernel", "rows", "--case", "two-sided K<=16", "--jobs", "1", "--json", str(out)],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    entries = json.loads(out.read_text())
    assert len(entries) == len(kr.plan([86], ["bf16"], ["rows"], "two-sided K<=16")) >= 1
    for e in entries:
        assert set(e) == KEYS
        assert e["limit_bytes"] == 101376 and e["fits"], e
        assert 0 < e["shared_bytes"] <= e["limit_bytes"] and e["registers"] > 0 and e["stack_bytes"] == 0
    assert "1 fit" in run.stdout or f"{len(entries)} fit" in run.stdout
    again = subprocess.run([sys.executable, "-c", RECOMPILE, str(out)], capture_output=True, text=True, timeout=600,
                           env=ENV | {"TRITON_CACHE_DIR": str(tmp_path / "fresh-cache")})
    assert again.returncode == 0, again.stderr
    assert int(again.stdout.split()[-1]) == entries[0]["shared_bytes"]


def test_the_report_refuses_the_interpreter():
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        kr.report([86], ["bf16"], ["rows"], "two-sided K<=16")


FIT_CONTROL = """
from kplora_kernels import kernel_report as kr
kw = kr.plan([86], ["bf16"], ["rows"], "one-sided KV<=128")[0]
kw["constexprs"] = kw["constexprs"] | {"BLOCK_M": 128, "BLOCK_N": 256}
kw["num_warps"], kw["num_stages"] = 8, 2
e = kr.compile_entry(**kw)
print(e["shared_bytes"], e["limit_bytes"], e["fits"])
"""


def test_the_fit_verdict_flags_a_config_that_does_not_fit():
    """The control: a 128×256 tile of G and a 256×128 tile of V in bf16 (128 KiB staged for the dot)
    do not fit sm_86's 99 KiB."""
    run = subprocess.run([sys.executable, "-c", FIT_CONTROL], env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    shared, limit, fits = run.stdout.split()[-3:]
    assert int(shared) > int(limit) and fits == "False"
