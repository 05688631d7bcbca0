"""FusedKeepLoRALinear forward+backward against a frozen nn.Linear alone and peft's LoRA layer.

Each round: forward, then backward with a fixed output gradient (the input needs a gradient, as
inside a network). peft's ``lora_A`` is frozen, as KeepLoRA's is, so the trainable work is the
same. Saved-activation bytes are recorded in ``extra_info``. CPU fp32 here; bf16 on a GPU.
Full sizes with ``KPLORA_BENCH_FULL=1`` (``make bench``); quick sizes otherwise.
"""
import pytest
import torch
from torch import nn

from bench_sizes import FULL
from kplora_kernels.nn import FusedKeepLoRALinear
from kplora_kernels.profiling import saved_activation_bytes

SHAPES = [(4096, 4096), (4096, 11008)] if FULL else [(64, 96)]
RANKS = [16, 64] if FULL else [4, 16]
TOKENS = [4096] if FULL else [128]
if torch.cuda.is_available():
    DEVICE, DTYPE = "cuda", torch.bfloat16
    if FULL:
        TOKENS = [4096, 16384]
else:
    DEVICE, DTYPE = "cpu", torch.float32


def build(method, in_f, out_f, rank):
    linear = nn.Linear(in_f, out_f, device=DEVICE, dtype=DTYPE).requires_grad_(False)
    if method == "linear":
        return linear
    if method == "ours":
        layer = FusedKeepLoRALinear.from_linear(linear, rank, alpha=rank / 4)
    else:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(nn.Sequential(linear), peft.LoraConfig(r=rank, lora_alpha=rank / 4,
                                                                           target_modules=["0"]))
        layer = model.base_model.model[0]
        layer.lora_A["default"].weight.requires_grad_(False)
        layer.to(device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(std=0.01)  # a non-zero B, as mid-task
    return layer


@pytest.mark.parametrize("method", ["linear", "peft", "ours"])
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("in_f,out_f", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("tokens", TOKENS)
def test_lora_linear_fwd_bwd(benchmark, tokens, in_f, out_f, rank, method):
    layer = build(method, in_f, out_f, rank)
    x = torch.randn(tokens, in_f, device=DEVICE, dtype=DTYPE, requires_grad=True)
    grad_out = torch.randn(tokens, out_f, device=DEVICE, dtype=DTYPE)
    benchmark.group = f"lora linear {in_f}->{out_f} r={rank} tokens={tokens} {DTYPE}".replace("torch.", "")
    state = [*layer.parameters(), *layer.buffers()]
    saved = saved_activation_bytes(lambda: layer(x), exclude=state)
    benchmark.extra_info.update(method="ours" if method == "ours" else method, saved_activation_MiB=saved / 2**20)

    def step():
        x.grad = None
        layer(x).backward(grad_out)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
    assert x.grad is not None
