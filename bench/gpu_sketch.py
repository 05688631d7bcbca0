"""GPU figures of the task boundaries (issue 12; run by bench/gpu_check.sh; needs CUDA and triton).

1. The gradient-sketch update at LLaMA-7B's shapes (``out×in`` 11008×4096 and 4096×11008, r = 32,
   p = 8: ``K = 40`` columns of ``Ω̂``, ``L = 81`` rows of ``Ψ̂``; ``--tokens`` per batch; bf16):
   ``GradientSketch.update`` (the Triton one-read kernel, ``kplora_kernels.ops.sketch_triton``, plus
   the refusal check and the state add) against the two-GEMM torch forms adding the same batch into
   an fp32 state: ``Y += (dYᵀ (X Ω̂)).float()``, ``W += ((dY Ψ̂ᵀ)ᵀ X).float()`` in bf16, and (CUDA,
   torch ≥ 2.8) the same GEMMs with fp32 outputs (``torch.mm(..., out_dtype=torch.float32)``); min
   and median times. And the fraction of the one-read HBM limit the kernel alone and the update
   reach: the bytes of ``dY`` and ``X`` read once (``tokens·(out+in)·2``) per second, divided by the
   peak (``--peak-tbs``, 4.8 TB/s for an H200), next to the same fraction for a ``copy_`` of those
   bytes. Every form is first checked against float64: the kernel's error at most 4× the form's,
   plus a floor of fp32 roundings.
2. The boundaries on a ``--layers`` LLaMA-7B-shaped bf16 stack (``bench/gpu_memory.py``'s): the data
   pass of ``end_task`` (``KeepLoRA.collect_inputs``) against a plain no-grad forward over the same
   ``--batches``, and ``begin_task`` against a plain forward+backward, as in
   ``bench/test_bench_boundaries.py`` (targets ≤ 1.5× and ≤ 1.3×).

``--device cpu --tiny`` runs the same code at tiny shapes (the kernel under ``TRITON_INTERPRET=1``
with ``KPLORA_BACKEND=triton``) without meaning anything as figures: a smoke test. Prints one line
per figure and writes them as JSON to ``$OUT/gpu_sketch.json`` (or ``./gpu_sketch.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import roofline  # noqa: E402


def timer(device):
    """``(min, median)`` seconds per call of ``fn``: ``triton.testing.do_bench`` on CUDA, else a few
    wall-clock runs (the smoke run)."""
    if device.type == "cuda":
        import triton.testing

        def bench(fn):
            return tuple(triton.testing.do_bench(fn, warmup=10, rep=100, return_mode=mode) * 1e-3
                         for mode in ("min", "median"))
        return bench

    def wall(fn):
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times), sorted(times)[1]
    return wall


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def check(ours, oracle, own, what):
    """The kernel's error against float64 at most 4× the torch form's, plus a floor (tests' rule)."""
    floor = 8 * torch.finfo(torch.float32).eps * oracle.abs().max()
    err, own_err = (ours.double() - oracle).abs().max(), (own.double() - oracle).abs().max()
    if not err <= 4 * own_err + floor:
        raise AssertionError(f"{what}: kernel error {float(err):.3g} above 4 × torch's {float(own_err):.3g} + floor")


def sketch_update_figures(args, device, measure) -> dict:
    from kplora_kernels.ops import sketch_triton
    from kplora_kernels.subspace import GradientSketch

    dt, rank = torch.bfloat16, 32
    shapes = [(96, 160), (160, 96)] if args.tiny else [(11008, 4096), (4096, 11008)]
    tokens = 40 if args.tiny else args.tokens
    figures = {}
    for out_f, in_f in shapes:
        gen = torch.Generator().manual_seed(0)
        V = torch.linalg.qr(torch.randn(in_f, in_f // 2, generator=gen, dtype=torch.float64))[0].float().to(device)
        sketch = GradientSketch(out_f, in_f, rank, V=V, strategy="randomized", device=device)
        if not sketch_triton.usable(torch.empty(1, out_f, device=device, dtype=dt),
                                    torch.empty(1, in_f, device=device, dtype=dt), sketch.omega.shape[1],
                                    sketch.psi.shape[0]):
            raise RuntimeError(f"the Triton sketch kernel does not serve {out_f}x{in_f} in bf16 on {device} "
                               "(on the CPU it needs TRITON_INTERPRET=1 and KPLORA_BACKEND=triton)")
        dY = torch.randn(tokens, out_f, generator=gen).to(device, dt)
        X = torch.randn(tokens, in_f, generator=gen).to(device, dt)
        om, psi = sketch.omega.to(dt), sketch.psi.to(dt)  # the torch form's test matrices, in bf16
        Y, W = torch.zeros_like(sketch.Y), torch.zeros_like(sketch.W)

        def torch_form():  # what a user would write in bf16: bf16 outputs, upcast into the state
            Y.add_((dY.mT @ (X @ om)).float())
            W.add_(((dY @ psi.mT).mT @ X).float())

        def torch_fp32_out():  # the stronger form: fp32 outputs of the bf16 GEMMs (CUDA, torch ≥ 2.8)
            Y.add_(torch.mm(dY.mT, X @ om, out_dtype=torch.float32))
            W.add_(torch.mm((dY @ psi.mT).mT, X, out_dtype=torch.float32))

        def kernel():
            return sketch_triton.sketch_update(dY, X, sketch.omega, sketch.psi.mT)

        def update():  # the library's path: the kernel, the refusal check and the state add
            sketch.update(dY, X)

        c1, c2, _ = kernel()
        o1 = dY.double().mT @ (X.double() @ sketch.omega.double())
        o2 = (dY.double() @ sketch.psi.double().mT).mT @ X.double()
        forms = {"torch_two_gemm_bf16": torch_form}
        if device.type == "cuda" and hasattr(torch.ops.aten.mm, "dtype"):
            forms["torch_two_gemm_fp32_out"] = torch_fp32_out
        for form in forms.values():
            Y.zero_(), W.zero_()
            form()
            check(c1, o1, Y, f"{out_f}x{in_f} Y")
            check(c2.mT, o2, W, f"{out_f}x{in_f} W")
        times = {name: measure(form) for name, form in forms.items()}
        times["GradientSketch.update"] = measure(update)
        times["triton_kernel"] = measure(kernel)
        both = torch.cat([dY.reshape(-1), X.reshape(-1)])
        buffer = torch.empty_like(both)
        times["copy_"] = measure(lambda: buffer.copy_(both))
        read = both.numel() * both.element_size()
        peak = args.peak_tbs * 1e12
        t_update = times["GradientSketch.update"][0]
        name = f"{out_f}x{in_f}"
        figures[name] = {
            "tokens": tokens, "K": sketch.omega.shape[1], "L": sketch.psi.shape[0],
            "ms_min_median": {k: [t * 1e3 for t in v] for k, v in times.items()},
            # like for like: both add one batch into an fp32 state
            "torch_over_update": {k: times[k][0] / t_update for k in forms},
            "one_read_fraction": {"triton_kernel": read / times["triton_kernel"][0] / peak,
                                  "GradientSketch.update": read / t_update / peak,
                                  "copy_ (reads and writes)": 2 * read / times["copy_"][0] / peak}}
        cost = roofline.sketch_cost(tokens, out_f, in_f, sketch.omega.shape[1], sketch.psi.shape[0], 2)
        for form in ("triton_kernel", "GradientSketch.update"):
            v = roofline.verdict(cost, times[form][0], args.peak_tbs)
            figures[name][f"{form}_roofline"] = v
            print(roofline.line(f"sketch update {name} bf16 {tokens} tokens {form}", v, args.peak_tbs))
        f = figures[name]["one_read_fraction"]
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in figures[name]["torch_over_update"].items())
        print(f"gradient sketch update {name} bf16, {tokens} tokens, K={figures[name]['K']} L={figures[name]['L']}: "
              + ", ".join(f"{k} {v[0] * 1e3:.3f} ms (median {v[1] * 1e3:.3f})" for k, v in times.items())
              + f"; torch ÷ update: {ratios}; one-read fraction of {args.peak_tbs} TB/s: kernel "
              f"{f['triton_kernel']:.2f}, update {f['GradientSketch.update']:.2f} "
              f"(copy_ {f['copy_ (reads and writes)']:.2f})", flush=True)
    return figures


def boundary_figures(args, device) -> dict:
    import gpu_memory

    from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig

    dt = torch.bfloat16
    tokens, batches, rank = (16, 2, 4) if args.tiny else (args.tokens, args.batches, 32)
    model, hidden = gpu_memory.build(args, device, dt)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(1, tokens, hidden, generator=gen).to(device, dt),
             torch.randn(1, tokens, hidden, generator=gen).to(device, dt)) for _ in range(batches)]

    def forward(m, b):
        return m(b[0])

    def loss(m, b):
        return (m(b[0]).float() - b[1].float()).pow(2).mean()

    cfg = KeepLoRAConfig(rank=rank, alpha=rank / 4, eps_w={"default": 0.6}, eps_f=0.99,
                         targets=[rf"\.({'|'.join(gpu_memory.TARGETS)})$"])
    kl = KeepLoRA(model, cfg, progress=False, placement="device")

    def timed(fn, rounds=3):
        best = float("inf")
        for _ in range(rounds):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - start)
        return best

    def plain_forward():
        with torch.no_grad():
            for b in data:
                forward(model, b)

    def plain_forward_backward():
        for b in data:
            loss(model, b).backward()
        for p in kl.trainable_parameters():
            p.grad = None

    def begin():
        kl.task_open = False  # each round re-runs the task start
        kl.begin_task(data, loss)

    t_begin = timed(begin)  # also opens the task: the adapters exist and are trainable
    t_fwd_bwd = timed(plain_forward_backward)
    t_fwd = timed(plain_forward)
    t_pass = timed(lambda: kl.collect_inputs(data, forward, 1.0, "input subspace"))
    figures = {"layers": args.layers, "tokens": tokens, "batches": batches, "rank": rank,
               "s": {"plain_forward": t_fwd, "data_pass": t_pass, "plain_forward_backward": t_fwd_bwd,
                     "begin_task": t_begin},
               "data_pass_over_forward": t_pass / t_fwd, "begin_task_over_forward_backward": t_begin / t_fwd_bwd}
    print(f"boundaries, {args.layers} LLaMA-7B-shaped bf16 layers, {batches}x{tokens} tokens: data pass "
          f"{t_pass * 1e3:.1f} ms / plain forward {t_fwd * 1e3:.1f} ms = {t_pass / t_fwd:.2f}x (target ≤ 1.5); "
          f"begin_task {t_begin * 1e3:.1f} ms / forward+backward {t_fwd_bwd * 1e3:.1f} ms = "
          f"{t_begin / t_fwd_bwd:.2f}x (target ≤ 1.3)", flush=True)
    return figures


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-tbs", type=float, default=None,
                        help="HBM peak in TB/s (default: by device name, bench/roofline.py; 4.8 on the CPU smoke run)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per batch (default 2048)")
    parser.add_argument("--batches", type=int, default=4, help="batches of the boundary passes (default 4)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the boundary stack (default 2)")
    parser.add_argument("--device", default="cuda", help="cuda (figures) or cpu (with --tiny: a smoke run)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs CUDA; use --device cpu --tiny for a smoke run")
    args.peak_tbs = roofline.peak_tbs(torch.cuda.get_device_name(), args.peak_tbs) if device.type == "cuda" \
        else (args.peak_tbs or 4.8)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (no figures)",
               "sketch_update": sketch_update_figures(args, device, timer(device)),
               "boundaries": boundary_figures(args, device)}
    path = os.path.join(os.environ.get("OUT", "."), "gpu_sketch.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"written {path}")
    return results


if __name__ == "__main__":
    main()
