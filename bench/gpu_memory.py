"""Peak device memory of KeepLoRA++ on a LLaMA-7B-shaped stack, in both basis placements, beside
the sizes of the items the plan of ``kplora memory`` adds up (issue 18; run by bench/gpu_check.sh).

A stack of ``--layers`` LLaMA decoder layers (hidden 4096, intermediate 11008, bf16, no embedding
or head) is wrapped with KeepLoRA (r = 32, ε_w = 0.6 on every q, k, v, o, gate, up, down), then for
each placement (``device``, ``cpu``) the script measures ``torch.cuda.max_memory_allocated`` —
reset before each phase — of a plain no-grad forward, ``begin_task`` over one batch, one AdamW
training step on ``B``, and ``end_task`` over one batch (``--tokens`` tokens). Beside the peaks it
prints the items: the weights, the bases (and how many bytes of them are on the device during
training), the gradient and input sketches by the sketches' own size formulas
(``gradient_sketch_bytes``, ``input_sketch_bytes``; input sketches counted per linear, an upper bound
where q/k/v and gate/up share one covariance) and the most linears' bases the placement had on the
device at once. The plan's claim to check: ``cpu`` training step ≈ ``device`` training step − the
bases, and boundary peaks that grow by the sketches, not by the bases.

``--device cpu --tiny`` runs the same code on a tiny stack without measuring (a smoke test); the
figures need CUDA. Prints one line per placement and writes JSON to ``$OUT/gpu_memory.json``
(or ``./gpu_memory.json``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Stack(torch.nn.Module):
    """``layers`` LLaMA decoder layers applied in turn (rotary embeddings computed once)."""

    def __init__(self, cfg, layers: int):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        self.layers = torch.nn.ModuleList(LlamaDecoderLayer(cfg, layer_idx=i) for i in range(layers))
        self.rope = LlamaRotaryEmbedding(cfg)

    def forward(self, x):
        position = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        emb = self.rope(x, position)
        for layer in self.layers:
            out = layer(x, position_embeddings=emb, position_ids=position)
            x = out[0] if isinstance(out, tuple) else out
        return x


def build(args, device, dtype):
    from transformers import LlamaConfig

    hidden, inter = (64, 172) if args.tiny else (4096, 11008)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=max(hidden // 128, 1),
                      num_key_value_heads=max(hidden // 128, 1), attn_implementation="sdpa")  # causal, as planned
    torch.manual_seed(0)
    model = Stack(cfg, args.layers).to(device)
    model.layers.to(dtype)  # the rotary frequencies stay fp32
    return model, hidden


class Meter:
    """Peak allocated bytes of a phase (None off CUDA)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        self.peak = None
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()


def run(args) -> dict:
    from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig
    from kplora_kernels.subspace.sketch import gradient_sketch_bytes, input_sketch_bytes

    device = torch.device(args.device)
    dtype = torch.bfloat16  # as on the GPU: the tiny CPU run exercises the same bf16 path
    tokens = 16 if args.tiny else args.tokens
    rank = 4 if args.tiny else 32
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (no figures)",
               "layers": args.layers, "tokens": tokens, "rank": rank, "phases": {}}
    for placement in args.placements:
        model, hidden = build(args, device, dtype)
        gen = torch.Generator().manual_seed(1)
        batch = (torch.randn(1, tokens, hidden, generator=gen).to(device, dtype),
                 torch.randn(1, tokens, hidden, generator=gen).to(device, dtype))

        def loss(m, b):
            return (m(b[0]).float() - b[1].float()).pow(2).mean()

        def forward(m, b):
            return m(b[0])

        with Meter(device) as plain_fwd, torch.no_grad():
            forward(model, batch)
        cfg = KeepLoRAConfig(rank=rank, alpha=rank / 4, eps_w={"default": 0.6}, eps_f=0.99,
                             targets=[rf"\.({'|'.join(TARGETS)})$"])
        kl = KeepLoRA(model, cfg, progress=False, placement=placement)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        bases = sum(t.nbytes for layer in kl.layers.values() for t in (layer.V, layer.U))
        grad_sketches = sum(gradient_sketch_bytes(layer.out_features, layer.in_features, rank)
                            for layer in kl.layers.values())
        input_sketches = sum(input_sketch_bytes(layer.in_features, layer.V.shape[1]) for layer in kl.layers.values())
        with Meter(device) as begin:
            kl.begin_task([batch], loss)
        opt = torch.optim.AdamW(kl.trainable_parameters(), lr=1e-4)
        kl.register_projection_hook(opt)
        with Meter(device) as step:
            opt.zero_grad(set_to_none=True)
            loss(model, batch).backward()
            opt.step()
        on_device = sum(t.nbytes for layer in kl.layers.values() for t in (layer.V, layer.U)
                        if t.device.type == device.type)
        with Meter(device) as end:
            kl.end_task([batch], forward)
        results["phases"][placement] = {
            "model_weights": weights, "bases_total": bases, "bases_on_device_in_training": on_device,
            "gradient_sketches": grad_sketches, "input_sketches_upper_bound": input_sketches,
            "max_resident_layers": kl.placement.max_resident_layers,
            "peak": {"plain_forward": plain_fwd.peak, "begin_task": begin.peak, "training_step": step.peak,
                     "end_task": end.peak}}
        del kl, model, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers in the stack (default 2)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per batch (default 2048)")
    parser.add_argument("--device", default="cuda", help="cuda (figures) or cpu (with --tiny: a smoke run)")
    parser.add_argument("--placements", nargs="+", default=["device", "cpu"], choices=["device", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="hidden 64 / intermediate 172: a smoke run")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs CUDA; use --device cpu --tiny for a smoke run")
    results = run(args)
    gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f} GiB"  # noqa: E731
    for placement, r in results["phases"].items():
        peaks = "  ".join(f"{k} {gib(v)}" for k, v in r["peak"].items())
        print(f"{placement:>6}: weights {gib(r['model_weights'])}, bases {gib(r['bases_total'])} "
              f"({gib(r['bases_on_device_in_training'])} on the device in training, at most "
              f"{r['max_resident_layers']} linears' at a boundary), sketches: gradient "
              f"{gib(r['gradient_sketches'])}, input ≤ {gib(r['input_sketches_upper_bound'])}; peaks: {peaks}")
    path = os.path.join(os.environ.get("OUT", "."), "gpu_memory.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
