"""What each continual-learning method costs at its task boundaries, against plain LoRA.

One LLaMA-7B-shaped decoder layer (hidden 4096, intermediate 11008, the 7 projections adapted;
quick: 64/172) is wrapped by each method (the wrap, e.g. KeepLoRA's principal subspaces, is set up
outside the timing: it runs once per model, not per task). The timed call is one task's boundaries:
``begin_task`` (KeepLoRA: task-gradient sketch → ``A``; InfLoRA: input pass → ``A``; LoRA, LoRA-FA,
O-LoRA: seeded initialisation) and ``end_task`` (merge; KeepLoRA, InfLoRA: input pass and GPM
expansion; O-LoRA: recording ``A``), with no training between them (what the boundaries cost does not depend on the trained values). The summary
prints ``lora/ours-<method>`` (< 1: the method's boundaries cost more than LoRA's). ``extra_info``
holds ``peak_extra_MiB``: the peak resident memory above the level at ``begin_task``, sampled every
0.2 ms by a thread reading ``/proc/self/statm`` (tensor frees return large blocks to the OS, so the
resident size follows the live tensors; spikes shorter than the sampling period can be missed).
"""
import os
import threading
import time

import pytest
import torch

from bench_sizes import FULL
from test_bench_llama_layer import BATCHES, HIDDEN, INTER, RANK, TARGETS, TOKENS, batches, build_layer, loss_of

CASES = [("lora", "lora"), ("lora-fa", "lora"), ("olora", "lora"), ("inflora", "lora"), ("keeplora", "lora"),
         ("keeplora++", "lora"), ("keeplora++", "full")]
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """The peak resident set size above the level at entry, sampled by a thread."""

    def __init__(self, period=2e-4):
        self.period, self.peak, self.base = period, 0, 0

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def wrapped(method, adapter):
    from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig

    layer, rope = build_layer()
    config = KeepLoRAConfig(method=method, adapter=adapter, rank=RANK, alpha=RANK / 4, eps_w={"default": 0.6},
                            eps_f=0.99, targets=[rf"\.({'|'.join(TARGETS)})$"])
    kl = KeepLoRA(layer, config, progress=False,
                  layer_index={f"{p}.{t}": 0 for p in ("self_attn", "mlp") for t in TARGETS})
    return kl, (lambda model, batch: loss_of(model, rope, batch))


@pytest.mark.parametrize("method,adapter", CASES, ids=[f"{m}-{a}" for m, a in CASES])
def test_method_task_boundaries(benchmark, method, adapter):
    torch.set_num_threads(2)
    data = batches()
    timings = {}

    def one_task(pair):
        kl, loss = pair
        with PeakRSS() as memory:
            start = time.perf_counter()
            kl.begin_task(data, loss)
            begin = time.perf_counter() - start
            kl.end_task(data, loss)
            end = time.perf_counter() - start - begin
        timings.update(begin_s=begin, end_s=end, peak_extra_MiB=memory.extra_mib)
        assert kl.task_index == 1 and not kl.task_open

    benchmark.group = (f"task boundaries, one LLaMA layer {HIDDEN}/{INTER}, {BATCHES}x{TOKENS} tokens, r={RANK}")
    benchmark.pedantic(one_task, setup=lambda: ((wrapped(method, adapter),), {}),
                       rounds=3 if FULL else 1, iterations=1)
    name = "lora" if (method, adapter) == ("lora", "lora") else f"ours-{method}{'-full' if adapter == 'full' else ''}"
    benchmark.extra_info.update(method=name, **timings)
