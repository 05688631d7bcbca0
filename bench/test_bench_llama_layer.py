"""One LLaMA-7B-shaped decoder layer (hidden 4096, intermediate 11008; quick: 64/172) through a whole
task — begin (task gradient → A), training steps, end (merge, input subspaces → V) — with the
controller against the authors' approach (full weight gradients accumulated, dense projector
matrices, full SVDs, all layer inputs stored and decomposed). Each runs in its own process; peak
RSS above the model's own footprint is recorded in ``extra_info`` (``peak_extra_MiB``).
"""
import multiprocessing as mp
import resource
import time

import pytest
import torch

from bench_sizes import FULL

HIDDEN, INTER, TOKENS, BATCHES, STEPS = (4096, 11008, 256, 2, 2) if FULL else (64, 172, 16, 2, 2)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, EPS_W, EPS_F = 32 if FULL else 4, 0.6, 0.99


def build_layer():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HIDDEN // 64 if FULL else 4,
                      num_key_value_heads=HIDDEN // 64 if FULL else 4)
    torch.manual_seed(0)
    layer, rope = LlamaDecoderLayer(cfg, layer_idx=0), LlamaRotaryEmbedding(cfg)
    layer.requires_grad_(False)
    return layer, rope


def batches():
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(1, TOKENS, HIDDEN, generator=gen), torch.randn(1, TOKENS, HIDDEN, generator=gen))
            for _ in range(BATCHES)]


def forward(layer, rope, x):
    position = torch.arange(x.shape[1]).unsqueeze(0)
    out = layer(x, position_embeddings=rope(x, position), position_ids=position)
    return out[0] if isinstance(out, tuple) else out


def loss_of(layer, rope, batch):
    x, target = batch
    return ((forward(layer, rope, x) - target) ** 2).mean()


def ours(layer, rope, data):
    from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig

    config = KeepLoRAConfig(rank=RANK, alpha=RANK / 4, eps_w={"default": EPS_W}, eps_f=EPS_F,
                            targets=[rf"\.({'|'.join(TARGETS)})$"])
    kl = KeepLoRA(layer, config, progress=False, layer_index={f"{p}.{t}": 0 for p in ("self_attn", "mlp") for t in TARGETS})
    loss = lambda model, batch: loss_of(model, rope, batch)  # noqa: E731
    kl.begin_task(data, loss)
    opt = torch.optim.AdamW(kl.trainable_parameters(), lr=1e-3)
    kl.register_projection_hook(opt)
    for step in range(STEPS):
        opt.zero_grad()
        loss(layer, data[step % len(data)]).backward()
        opt.step()
    kl.end_task(data, loss)


def authors(layer, rope, data):
    """Full gradients, dense projectors and SVDs, stored activations (the released code's approach)."""
    from kplora_kernels import gpm_expand, principal_subspace

    linears = {name: m for name, m in layer.named_modules() if name.split(".")[-1] in TARGETS}
    bases = {n: principal_subspace(m.weight, EPS_W, "in", method="svd") for n, m in linears.items()}
    for m in linears.values():
        m.weight.requires_grad_(True)
    for batch in data:
        loss_of(layer, rope, batch).backward()  # accumulates full out×in gradients
    A = {}
    for n, m in linears.items():
        projector = torch.eye(m.in_features) - bases[n] @ bases[n].T  # dense in×in
        G = (m.weight.grad / len(data)) @ projector
        A[n] = torch.linalg.svd(G, full_matrices=False)[2][:RANK]
        m.weight.grad = None
        m.weight.requires_grad_(False)
    B = {n: torch.zeros(m.out_features, RANK, requires_grad=True) for n, m in linears.items()}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: out + (inp[0] @ A[n].T) @ B[n].T)
             for n, m in linears.items()]
    opt = torch.optim.AdamW(B.values(), lr=1e-3)
    for step in range(STEPS):
        opt.zero_grad()
        loss_of(layer, rope, data[step % len(data)]).backward()
        opt.step()
    for h in hooks:
        h.remove()
    stored = {n: [] for n in linears}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: stored[n].append(inp[0].detach().reshape(-1, mod.in_features)))
             for n, m in linears.items()]
    with torch.no_grad():
        for n, m in linears.items():
            m.weight += (B[n] @ A[n]) * (RANK / 4) / RANK
        for x, _ in data:
            forward(layer, rope, x)
    for h in hooks:
        h.remove()
    for n in linears:
        gpm_expand(bases[n], torch.cat(stored[n]), EPS_F)


def _child(method, queue):
    torch.set_num_threads(2)
    layer, rope = build_layer()
    data = batches()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    (ours if method == "ours" else authors)(layer, rope, data)
    queue.put((time.perf_counter() - start, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024))


@pytest.mark.parametrize("method", ["authors", "ours"])
def test_llama_layer_task(benchmark, method):
    ctx = mp.get_context("spawn")

    def run():
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(method, queue))
        proc.start()
        seconds, peak = queue.get(timeout=3600)
        proc.join()
        assert proc.exitcode == 0
        return seconds, peak

    benchmark.group = f"one LLaMA layer {HIDDEN}/{INTER}, {BATCHES}x{TOKENS} tokens, r={RANK}: whole task"
    seconds, peak = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(method=method, task_seconds=seconds, peak_extra_MiB=peak)
