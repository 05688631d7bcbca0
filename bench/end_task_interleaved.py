"""``end_task``'s data pass against a plain forward, alternated round by round so that a drifting
machine affects both alike (issue 12's ≤ 1.5× target; the benchmark ``test_end_task`` takes each
in its own block of rounds). On the benchmark's LLaMA-shaped layer (hidden 2048, intermediate 5504,
r = 32, 4 batches of 1024 tokens, fp32, CPU); the GPM expansion is replaced by a no-op, as in
``ours_end_task_data_pass``.

    python bench/end_task_interleaved.py [--rounds 5] [--residual-energy auto|exact|estimate]

Prints each round's times and ratio, then the median, min and max ratio.
"""
import argparse
import os
import statistics
import sys
import time

import torch

os.environ["KPLORA_BENCH_FULL"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import test_bench_boundaries as boundaries  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--residual-energy", default="auto", choices=["auto", "exact", "estimate"])
    args = parser.parse_args(argv)
    from kplora_kernels.continual import controller

    kl, data, forward, _ = boundaries.state()
    kl.config.residual_energy = args.residual_energy
    controller.InputSketch.expand = lambda self, V, *a, **k: V.clone()  # the data pass only
    saved = {n: (layer.V.clone(), layer.V_complement, layer.weight.detach().clone()) for n, layer in kl.layers.items()}

    def restore():
        for name, layer in kl.layers.items():
            V, complement, W = saved[name]
            layer.set_bases(V=V, V_complement=complement)
            with torch.no_grad():
                layer.weight.copy_(W)
        kl.task_open = True

    ratios = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        with torch.no_grad():
            for batch in data:
                forward(kl.model, batch)
        plain = time.perf_counter() - start
        restore()
        start = time.perf_counter()
        kl.end_task(data, forward)
        ours = time.perf_counter() - start
        ratios.append(ours / plain)
        print(f"plain forward {plain:.2f} s, end_task data pass {ours:.2f} s, ratio {ours / plain:.3f}", flush=True)
    print(f"residual_energy={args.residual_energy}: median {statistics.median(ratios):.3f}, "
          f"min {min(ratios):.3f}, max {max(ratios):.3f}")


if __name__ == "__main__":
    main()
