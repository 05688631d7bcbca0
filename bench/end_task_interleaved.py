"""``end_task``'s data pass against a plain forward, alternated round by round so that a drifting
machine affects both alike (issue 12's ≤ 1.5× target; the benchmark ``test_end_task`` takes each
in its own block of rounds). On the benchmark's LLaMA-shaped layer (hidden 2048, intermediate 5504,
r = 32, 4 batches of 1024 tokens, fp32, CPU). Each round times, in turn:

- a plain forward over the batches (no gradients);
- the data pass, ``KeepLoRA.collect_inputs`` (the input sketches built and fed by every batch);
- ``end_task`` with the GPM expansion replaced by a no-op (the merge, the data pass, and the bases
  set again, which re-orthonormalises each ``A``), as in ``ours_end_task_without_decompositions``.

    python bench/end_task_interleaved.py [--rounds 5] [--residual-energy auto|exact|estimate] [--repeat 1]

``--repeat K`` feeds the benchmark's batches K times in each pass (4·K batches), which spreads the
once-per-task costs (building the sketches, the merge, setting the bases) over more data.

Prints each round's times and ratios, then the median, min and max of each ratio.
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
    parser.add_argument("--repeat", type=int, default=1, help="feed the batches this many times per pass")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be an integer ≥ 1, got {args.repeat}")
    from kplora_kernels.continual import controller

    kl, data, forward, _ = boundaries.state()
    data = list(data) * args.repeat
    kl.config.residual_energy = args.residual_energy
    controller.InputSketch.expand = lambda self, V, *a, **k: V.clone()  # no decomposition
    restore = boundaries.snapshot(kl)

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def plain():
        with torch.no_grad():
            for batch in data:
                forward(kl.model, batch)

    ratios = {"data pass": [], "end_task without decompositions": []}
    for _ in range(args.rounds):
        base = timed(plain)
        restore()
        passed = timed(lambda: kl.collect_inputs(data, forward, 1.0, "input subspace"))
        restore()
        ended = timed(lambda: kl.end_task(data, forward))
        ratios["data pass"].append(passed / base)
        ratios["end_task without decompositions"].append(ended / base)
        print(f"plain forward {base:.2f} s, data pass {passed:.2f} s ({passed / base:.3f}×), "
              f"end_task without decompositions {ended:.2f} s ({ended / base:.3f}×)", flush=True)
    for what, values in ratios.items():
        print(f"residual_energy={args.residual_energy}, {len(data)} batches, {what}: median {statistics.median(values):.3f}, "
              f"min {min(values):.3f}, max {max(values):.3f}")


if __name__ == "__main__":
    main()
