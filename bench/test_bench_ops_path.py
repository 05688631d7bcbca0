"""A LLaMA-shaped FusedKeepLoRALinear forward+backward with both bases: the op layer's path against
the formulation it replaced and against peft's LoRA layer, in the same run.

* ``ours`` — the layer as shipped: the backward projects ``dB`` onto ``(I − UUᵀ)`` and ``dA`` onto
  ``(I − VVᵀ)`` through the registered ops ``kplora::residual_projection``/``kplora::row_projection``
  (the dispatcher picks the backend; on the CPU the torch backend serves these thin factors, see
  ``kplora_kernels.ops.dispatch.cpp_pays``).
* ``inline`` — the same layer with the projections written inline in the backward as plain torch
  (``dB − U(UᵀdB)``, ``dA − (dA V)Vᵀ``), the formulation before the op layer.
* ``peft`` — peft's ``LoraLayer`` (no projection at all).

``lora_A`` is trainable in all three (so both projections run). CPU fp32 here, bf16 on a GPU.
LLaMA-7B shapes (4096→4096, 4096→11008) with ``KPLORA_BENCH_FULL=1``; a scaled-down layer otherwise.
"""
import pytest
import torch
from torch import nn

from bench_sizes import FULL
from kplora_kernels.nn import FusedKeepLoRALinear, linear as linear_module

if FULL:
    SHAPES, RANK, TOKENS, K_IN, K_OUT = [(4096, 4096), (4096, 11008)], 16, 2048, 1024, 256
else:
    SHAPES, RANK, TOKENS, K_IN, K_OUT = [(256, 688)], 16, 256, 64, 32
if torch.cuda.is_available():
    DEVICE, DTYPE = "cuda", torch.bfloat16
else:
    DEVICE, DTYPE = "cpu", torch.float32


class _InlineFunction(linear_module._KeepLoRAFunction):
    """The layer's autograd function with the two projections as inline torch products."""

    @staticmethod
    def backward(ctx, dY):
        h, x, x_d, W, A, B, U, V = ctx.saved_tensors
        c, dt = ctx.c, dY.dtype
        dY2 = dY.reshape(-1, dY.shape[-1])
        dYB = dY2 @ B.to(dt)
        dx = (dY2 @ W.to(dt)).addmm_(dYB, A.to(dt), alpha=c).view(*dY.shape[:-1], W.shape[1]) \
            if ctx.needs_input_grad[0] else None
        dB = c * (dY2.mT @ h.reshape(-1, h.shape[-1]).to(dt))
        if U is not None:
            Ud = U.to(dt)
            dB = dB - Ud @ (Ud.mT @ dB)
        dA = c * (dYB.mT @ x.reshape(-1, x.shape[-1]).to(dt))
        if V is not None:
            Vd = V.to(dt)
            dA = dA - (dA @ Vd) @ Vd.mT
        return dx, None, None, None, dA, dB, None, None, None, None, None


def _basis(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=gen))[0].to(DEVICE)


def build(method, in_f, out_f):
    linear = nn.Linear(in_f, out_f, device=DEVICE, dtype=DTYPE).requires_grad_(False)
    if method == "peft":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(nn.Sequential(linear), peft.LoraConfig(r=RANK, lora_alpha=RANK / 4,
                                                                           target_modules=["0"]))
        layer = model.base_model.model[0].to(device=DEVICE, dtype=DTYPE)
    else:
        layer = FusedKeepLoRALinear.from_linear(linear, RANK, alpha=RANK / 4, train_A=True)
        layer.set_bases(V=_basis(in_f, K_IN, 1), U=_basis(out_f, K_OUT, 2))
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(std=0.01)  # a non-zero B, as mid-task
    return layer


@pytest.mark.parametrize("method", ["peft", "inline", "ours"])
@pytest.mark.parametrize("in_f,out_f", SHAPES, ids=lambda v: str(v))
def test_ops_path_fwd_bwd_both_bases(benchmark, monkeypatch, in_f, out_f, method):
    layer = build(method, in_f, out_f)
    if method == "inline":
        monkeypatch.setattr(linear_module, "_KeepLoRAFunction", _InlineFunction)
    x = torch.randn(TOKENS, in_f, device=DEVICE, dtype=DTYPE, requires_grad=True)
    grad_out = torch.randn(TOKENS, out_f, device=DEVICE, dtype=DTYPE)
    benchmark.group = (f"ops path {in_f}->{out_f} r={RANK} k_in={K_IN} k_out={K_OUT} tokens={TOKENS} "
                       f"{DTYPE}").replace("torch.", "")
    benchmark.extra_info.update(method=method)
    trainable = [p for p in layer.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in trainable:
            p.grad = None
        layer(x).backward(grad_out)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
    assert x.grad is not None and all(p.grad is not None for p in trainable)
    if method != "peft":  # both projections ran: the gradients respect the constraints
        assert (layer.U.to(torch.float32).T @ layer.lora_B.grad.float()).abs().max() < 1e-3
        assert (layer.lora_A.grad.float() @ layer.V.to(torch.float32)).abs().max() < 1e-3


# --- where the C++ kernel pays on the CPU (kplora_kernels.ops.dispatch.cpp_pays) --------------------
# rows, cols, k_out, k_in: LoRA factors (dB out×r against U, dA r×in against V) and square weights
CROSSOVER = ([(4096, 16, 64, 0), (16, 4096, 0, 256), (11008, 16, 64, 0), (256, 256, 0, 16), (1024, 1024, 0, 64),
              (2048, 2048, 0, 128), (4096, 4096, 0, 256), (2048, 2048, 64, 128), (128, 1024, 16, 16)]
             if FULL else [(512, 16, 32, 0), (256, 256, 0, 16)])


@pytest.mark.skipif(DEVICE != "cpu", reason="the C++ kernels run on the CPU")
@pytest.mark.parametrize("method", ["torch_backend", "ours_cpp"])
@pytest.mark.parametrize("rows,cols,k_out,k_in", CROSSOVER, ids=lambda v: str(v))
def test_cpp_against_the_torch_backend_in_place(benchmark, rows, cols, k_out, k_in, method):
    from kplora_kernels import ops
    from kplora_kernels.ops import cpp

    if method == "ours_cpp" and not cpp.load(jit=True):
        pytest.skip(f"C++ kernels unavailable: {cpp.unavailable_reason()}")
    G = torch.randn(rows, cols)
    U = _basis(rows, k_out, 3) if k_out else None
    V = _basis(cols, k_in, 4) if k_in else None
    benchmark.group = f"in-place projection {rows}x{cols} k_out={k_out} k_in={k_in} float32"
    benchmark.extra_info.update(method=method)
    backend = "cpp" if method == "ours_cpp" else "torch"
    benchmark(lambda: ops.residual_project(G, U, V, 1.0, out=G, backend=backend))
    if U is not None:
        assert (U.T @ G).abs().max() < 1e-3
    if V is not None:
        assert (G @ V).abs().max() < 1e-3
