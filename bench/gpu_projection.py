"""GPU figures of the Triton projection kernels (run by bench/gpu_check.sh; needs CUDA and triton).

bf16, 4096×11008 (a LLaMA-7B ``down_proj`` gradient; ``G`` is ``out×in``):
* ratio of the obvious torch composition ``s·(G − (G V) Vᵀ)`` to ours, one- and two-sided;
* fraction of the one-read-one-write HBM limit reached by the one-sided kernel: achieved bytes/s
  (``2 · numel · 2`` bytes per call: one read and one write of bf16 ``G``) divided by the peak
  (``--peak-tbs``, else by device name: H200 4.8, A100-80GB 2.0, RTX 4090 1.0 TB/s), next to the
  same fraction for ``torch.copy_``; and per timed op a ``ROOFLINE`` line (bench/roofline.py): bytes
  moved and FLOPs per call, the HBM-bound limit and the percentage of it reached;
* a LLaMA-7B layer's seven gradients: the grouped in-place projection vs the in-place composition
  per weight, and the constraint restore.
Every timed kernel is first checked against the float64 reference. Prints one line per figure and
writes them as JSON to ``$OUT/gpu_projection.json`` (or ``./gpu_projection.json``).
"""
import argparse
import json
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import roofline  # noqa: E402

from kplora_kernels import ops
from kplora_kernels.ops import torch_backend


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="min") * 1e-3  # seconds


def basis(dim, k, gen, dtype):
    return torch.linalg.qr(torch.randn(dim, k, generator=gen, dtype=torch.float64))[0].to("cuda", dtype)


def check(result, G, U, V, scale):
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    oracle = torch_backend.residual_project(as64(G), as64(U), as64(V), scale)
    own = torch_backend.residual_project(G, U, V, scale)
    err = (result.double() - oracle).abs().max().item()
    ref_err = (own.double() - oracle).abs().max().item()
    bound = 4 * ref_err + 2 * torch.finfo(G.dtype).eps * abs(scale) * G.abs().max().item()
    assert err <= bound, f"kernel error {err:.3g} above {bound:.3g} (reference's own {ref_err:.3g})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-tbs", type=float, default=None,
                        help="HBM peak in TB/s (default: by device name, bench/roofline.py)")
    parser.add_argument("--k", type=int, default=64, help="basis width k_in (and k_out for two-sided)")
    args = parser.parse_args()
    args.peak_tbs = roofline.peak_tbs(torch.cuda.get_device_name(), args.peak_tbs)
    dt, out_dim, in_dim, k, s = torch.bfloat16, 4096, 11008, args.k, 0.5
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(out_dim, in_dim, generator=gen).to("cuda", dt)
    V = basis(in_dim, k, gen, dt)
    U = basis(out_dim, k, gen, dt)
    figures = {"device": torch.cuda.get_device_name(), "shape": [out_dim, in_dim], "k": k, "dtype": "bf16"}
    nbytes = 2 * G.numel() * G.element_size()

    for sides, U_ in (("V", None), ("UV", U)):
        check(ops.residual_project(G, U_, V, s, backend="triton"), G, U_, V, s)
        H = G.clone()
        ops.residual_project(H, U_, V, 1.0, out=H, backend="triton")
        check(H, G, U_, V, 1.0)
        t_comp = bench(lambda: torch_backend.residual_project(G, U_, V, s))
        t_ours = bench(lambda: ops.residual_project(G, U_, V, s, backend="triton"))
        t_inpl = bench(lambda: ops.residual_project(H, U_, V, 1.0, out=H, backend="triton"))
        figures[f"{sides}_ms"] = {"composition": t_comp * 1e3, "ours": t_ours * 1e3, "ours_inplace": t_inpl * 1e3}
        figures[f"{sides}_composition_over_ours"] = t_comp / t_ours
        cost = roofline.projection_cost(out_dim, in_dim, k if U_ is not None else 0, k, G.element_size())
        for name, t in (("ours", t_ours), ("ours_inplace", t_inpl)):
            v = roofline.verdict(cost, t, args.peak_tbs)
            figures[f"{sides}_{name}_roofline"] = v
            print(roofline.line(f"projection {sides} bf16 {out_dim}x{in_dim} k={k} {name}", v, args.peak_tbs))
        print(f"{sides:2s} bf16 {out_dim}x{in_dim} k={k}: composition {t_comp * 1e3:.3f} ms, ours {t_ours * 1e3:.3f} ms "
              f"(in place {t_inpl * 1e3:.3f} ms); composition/ours = {t_comp / t_ours:.2f}x")
        if sides == "V":
            buffer = torch.empty_like(G)
            t_copy = bench(lambda: buffer.copy_(G))
            for name, t in (("ours", t_ours), ("ours_inplace", t_inpl), ("copy_", t_copy)):
                frac = nbytes / t / (args.peak_tbs * 1e12)
                figures[f"V_{name}_hbm_fraction"] = frac
                print(f"   one read + one write of G: {name} {nbytes / t / 1e12:.2f} TB/s = {frac:.2f} of "
                      f"{args.peak_tbs} TB/s")

    # a LLaMA-7B layer: seven gradients, one input-side basis per input size
    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    bases = {n: basis(n, k, gen, dt) for n in (4096, 11008)}
    Gs = [torch.randn(o, n, generator=gen).to("cuda", dt) for o, n in shapes]
    Vs = [bases[n] for _, n in shapes]
    Hs = [G_.clone() for G_ in Gs]
    ops.residual_project_grouped_(Hs, None, Vs, 1.0, backend="triton")
    for H_, G_, V_ in zip(Hs, Gs, Vs):
        check(H_, G_, None, V_, 1.0)

    def composition_():
        for G_, V_ in zip(Hs, Vs):
            G_.sub_((G_ @ V_) @ V_.T)

    t_comp = bench(composition_)
    t_ours = bench(lambda: ops.residual_project_grouped_(Hs, None, Vs, 1.0, backend="triton"))
    Ws = [G_.clone() for G_ in Gs]
    anchors = [ops.subspace_anchor(W_, None, V_) for W_, V_ in zip(Ws, Vs)]
    t_restore = bench(lambda: ops.subspace_restore_grouped_(Ws, None, Vs, anchors=anchors, backend="triton"))
    figures["layer_grouped_ms"] = {"composition_inplace": t_comp * 1e3, "ours_grouped_inplace": t_ours * 1e3,
                                   "restore_grouped": t_restore * 1e3}
    figures["layer_composition_over_ours"] = t_comp / t_ours
    layer = {key: sum(roofline.projection_cost(o, n, 0, k, 2)[key] for o, n in shapes) for key in ("bytes", "flops")}
    for name, t in (("grouped projection", t_ours), ("grouped restore", t_restore)):
        v = roofline.verdict(layer, t, args.peak_tbs)
        figures[f"layer_{name.replace(' ', '_')}_roofline"] = v
        print(roofline.line(f"LLaMA-7B layer {name} bf16 k={k}", v, args.peak_tbs))
    print(f"LLaMA-7B layer (7 weights) bf16 k={k}: in-place composition {t_comp * 1e3:.3f} ms, grouped ours "
          f"{t_ours * 1e3:.3f} ms ({t_comp / t_ours:.2f}x); grouped restore {t_restore * 1e3:.3f} ms")

    path = os.path.join(os.environ.get("OUT", "."), "gpu_projection.json")
    with open(path, "w") as f:
        json.dump(figures, f, indent=1)
    print(f"written {path}")


if __name__ == "__main__":
    main()
