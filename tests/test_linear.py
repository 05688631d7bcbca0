"""FusedKeepLoRALinear against plain torch compositions and peft's LoRA layer."""
import pytest
import torch
from torch import nn

from helpers import raises, random_basis
from kplora_kernels.nn import FusedKeepLoRALinear, register_projection_hooks
from kplora_kernels.nn.linear import _KeepLoRAFunction


def make_layer(in_f=16, out_f=12, rank=4, alpha=2.0, layer_scale=0.5, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    layer = FusedKeepLoRALinear.from_linear(nn.Linear(in_f, out_f, dtype=dtype), rank, alpha, layer_scale, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def orthogonal_rows(rank, V, seed=1):
    """``rank×in`` orthonormal rows orthogonal to the columns of ``V``."""
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(V.shape[0], rank, generator=gen, dtype=V.dtype)
    M = M - V @ (V.T @ M)
    return torch.linalg.qr(M)[0].T.contiguous()


def plain(layer, x):
    """The same layer as a plain torch composition (autograd gives the true gradients)."""
    return nn.functional.linear(x, layer.weight, layer.bias) + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T


def test_gradcheck_float64():
    layer = make_layer()
    W = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    fn = lambda x, W, b, A, B: _KeepLoRAFunction.apply(x, None, W, b, A, B, None, None, False, 0.25, None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, W, b, A, B))
    x_d = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)  # the dropout branch input
    fn_d = lambda x, x_d, A, B: _KeepLoRAFunction.apply(x, x_d, W, b, A, B, None, None, False, 0.25, None)  # noqa: E731
    assert torch.autograd.gradcheck(fn_d, (x, x_d, A, B))


def test_backward_projects_dB_and_dA_against_autograd():
    layer = make_layer(train_A=True)
    V, U = random_basis(16, 5), random_basis(12, 3)
    layer.set_bases(V=V, U=U)
    x = torch.randn(7, 16, dtype=torch.float64)
    target = torch.randn(7, 12, dtype=torch.float64)
    ((layer(x) - target) ** 2).sum().backward()
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    y = nn.functional.linear(x, layer.weight, layer.bias) + layer.scaling * (x @ A.T) @ B.T
    ((y - target) ** 2).sum().backward()
    I_out, I_in = torch.eye(12, dtype=torch.float64), torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(layer.lora_B.grad, (I_out - U @ U.T) @ B.grad)
    torch.testing.assert_close(layer.lora_A.grad, A.grad @ (I_in - V @ V.T))
    assert layer.weight.grad is None and layer.bias.grad is None


def test_equals_nn_linear_at_zero_B_and_shares_the_weight():
    lin = nn.Linear(16, 12)
    layer = FusedKeepLoRALinear.from_linear(lin, 4)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert not lin.weight.requires_grad and layer.lora_B.requires_grad and not layer.lora_A.requires_grad
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), lin(x))
    torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, torch.eye(4))


def test_matches_peft_lora():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12))
    reference = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    lora = reference.base_model.model[0]
    ours = FusedKeepLoRALinear.from_linear(nn.Linear(16, 12), rank=4, alpha=8)
    with torch.no_grad():
        ours.weight.copy_(lora.base_layer.weight)
        ours.bias.copy_(lora.base_layer.bias)
        lora.lora_B["default"].weight.normal_()
        ours.lora_A.copy_(lora.lora_A["default"].weight)
        ours.lora_B.copy_(lora.lora_B["default"].weight)
    lora.lora_A["default"].weight.requires_grad_(False)
    x1 = torch.randn(2, 6, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = lora(x1), ours(x2)
    torch.testing.assert_close(y2, y1)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(ours.lora_B.grad, lora.lora_B["default"].weight.grad)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2 ** -8)], ids=str)
def test_merge_unmerge_round_trip(dtype, tol):
    layer = make_layer(dtype=dtype)
    x = torch.randn(5, 16, dtype=dtype)
    W0, y0 = layer.weight.detach().clone(), layer(x).detach()
    layer.merge_()
    assert layer.merged
    expected = (W0.double() + layer.delta_weight().double())
    torch.testing.assert_close(layer.weight.double(), expected, atol=tol * expected.abs().max().item(), rtol=0)
    torch.testing.assert_close(layer(x).float(), y0.float(), atol=20 * tol, rtol=20 * tol)
    layer.unmerge_()
    torch.testing.assert_close(layer.weight.float(), W0.float(), atol=2 * tol * W0.abs().max().item(), rtol=0)
    with raises(RuntimeError, "not merged"):
        layer.unmerge_()


@pytest.mark.parametrize("with_hook", [True, False])
def test_old_input_invariance_after_adamw(with_hook):
    layer = make_layer(in_f=16, out_f=12, rank=3, dtype=torch.float32)
    V, U = random_basis(16, 6, torch.float32), random_basis(12, 4, torch.float32)
    layer.set_bases(V=V, U=U)
    layer.reset_adapter(orthogonal_rows(3, V.double()).float())
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    if with_hook:
        layer.register_projection_hook(opt)
    x, target = torch.randn(64, 16), torch.randn(64, 12)
    for _ in range(30):
        opt.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        opt.step()
    delta = layer.delta_weight()
    assert delta.abs().max() > 1e-2  # it learned something
    old = torch.randn(10, 6) @ V.T  # inputs in span(V)
    torch.testing.assert_close(layer(old), nn.functional.linear(old, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    leak = (U.T @ delta).abs().max().item()
    if with_hook:
        assert leak < 1e-6
    else:
        assert leak > 1e-4  # Adam's element-wise scaling leaves the subspace: why the hook exists


def test_register_projection_hooks_for_a_model():
    model = nn.Sequential(make_layer(dtype=torch.float32), nn.ReLU(), make_layer(in_f=12, out_f=12, dtype=torch.float32))
    for layer in (model[0], model[2]):
        layer.set_bases(U=random_basis(12, 3, torch.float32))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    handle = register_projection_hooks(model, opt)
    model(torch.randn(4, 16)).pow(2).sum().backward()
    opt.step()
    for layer in (model[0], model[2]):
        assert (layer.U.T @ layer.lora_B).abs().max() < 1e-6
    handle.remove()


def test_torch_compile_matches_eager():
    layer = make_layer(dtype=torch.float32)
    layer.set_bases(U=random_basis(12, 3, torch.float32))
    x = torch.randn(4, 16)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.pow(2).sum().backward()
    grad = layer.lora_B.grad.clone()
    layer.lora_B.grad = None
    y_eager = layer(x)
    y_eager.pow(2).sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(grad, layer.lora_B.grad)


def test_state_dict_round_trip_with_grown_bases():
    layer = make_layer(dtype=torch.float32)
    V = random_basis(16, 5, torch.float32)
    layer.set_bases(V=V, U=random_basis(12, 2, torch.float32))
    layer.reset_adapter(orthogonal_rows(4, V.double()).float())
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.merge_()
    fresh = FusedKeepLoRALinear(16, 12, rank=4)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.V.shape == (16, 5) and fresh.U.shape == (12, 2) and fresh.merged
    assert fresh.scaling == layer.scaling
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), layer(x))
    with raises(ValueError, "rank"):
        FusedKeepLoRALinear(16, 12, rank=3).load_state_dict(layer.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_paths(dtype):
    layer = make_layer(dtype=torch.float32)
    layer.set_bases(U=random_basis(12, 3, torch.float32))
    half = make_layer(dtype=torch.float32)
    half.load_state_dict(layer.state_dict())
    half.to(dtype)
    x = torch.randn(6, 16)
    y = half(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), layer(x), atol=0.05, rtol=0.05)
    y.float().pow(2).sum().backward()
    assert half.lora_B.grad.dtype == dtype
    assert (half.U.float().T @ half.lora_B.grad.float()).abs().max() < 0.05


def test_autocast_bf16():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), layer(x).detach(), atol=0.1, rtol=0.05)


def test_dropout_on_the_adapter_branch():
    layer = make_layer(dropout=0.5, dtype=torch.float32)
    x = torch.randn(8, 16, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    x_d = nn.functional.dropout(x, 0.5)
    expected = nn.functional.linear(x, layer.weight, layer.bias) + layer.scaling * (x_d @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(y, expected)
    layer.eval()
    torch.testing.assert_close(layer(x), plain(layer, x))


class DenseGradient:
    def __init__(self):
        self.G, self.tokens = 0.0, 0

    def update(self, dY, X):
        self.G = self.G + dY.T @ X
        self.tokens += X.shape[0]


class Inputs:
    def __init__(self):
        self.seen = []

    def update(self, X):
        self.seen.append(X)


def test_accumulator_hooks_see_the_weight_gradient_without_a_grad():
    layer = make_layer(dtype=torch.float64)
    layer.grad_accumulator, layer.input_accumulator = DenseGradient(), Inputs()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    target = torch.randn(2, 5, 12, dtype=torch.float64)
    ((layer(x) - target) ** 2).sum().backward()
    assert layer.weight.grad is None
    W = layer.weight.detach().clone().requires_grad_(True)
    y = nn.functional.linear(x, W, layer.bias) + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    ((y - target) ** 2).sum().backward()
    torch.testing.assert_close(layer.grad_accumulator.G, W.grad)
    assert layer.grad_accumulator.tokens == 10
    torch.testing.assert_close(layer.input_accumulator.seen[0], x.reshape(10, 16))


def test_bad_input_errors():
    layer = make_layer(dtype=torch.float32)
    with raises(ValueError, "(..., 16)", "(3, 15)"):
        layer(torch.randn(3, 15))
    with raises(TypeError, "floating-point", "torch.int64"):
        layer(torch.ones(3, 16, dtype=torch.long))
    for rank in (0, 13):
        with raises(ValueError, "rank", "12"):
            FusedKeepLoRALinear(16, 12, rank=rank)
    with raises(TypeError, "nn.Linear"):
        FusedKeepLoRALinear.from_linear(nn.Conv1d(3, 3, 1), 2)
    with raises(ValueError, "V", "16 rows", "(12, 3)"):
        layer.set_bases(V=random_basis(12, 3, torch.float32))
    with raises(ValueError, "U", "orthonormal"):
        layer.set_bases(U=3 * random_basis(12, 3, torch.float32))
    with raises(ValueError, "A", "(4, 16)", "(4, 12)"):
        layer.reset_adapter(torch.randn(4, 12))
    V = random_basis(16, 5, torch.float32)
    layer.set_bases(V=V)
    with raises(ValueError, "lora_A", "span(V)"):
        layer.reset_adapter(torch.randn(4, 16))
    with raises(ValueError, "dropout"):
        FusedKeepLoRALinear(16, 12, rank=2, dropout=1.0)


def peft_layer(in_f, out_f, rank, alpha):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(nn.Sequential(nn.Linear(in_f, out_f)),
                                peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"]))
    layer = model.base_model.model[0]
    layer.lora_A["default"].weight.requires_grad_(False)  # frozen A, as in KeepLoRA
    return layer


@pytest.mark.parametrize("train_A", [False, True])
def test_saved_activation_memory_not_more_than_peft(train_A):
    from kplora_kernels.profiling import saved_activation_bytes

    lora = peft_layer(64, 48, 8, 8)
    lora.lora_A["default"].weight.requires_grad_(train_A)
    ours = FusedKeepLoRALinear.from_linear(nn.Linear(64, 48), rank=8, alpha=8, train_A=train_A)
    x = torch.randn(4, 32, 64, requires_grad=True)
    theirs = saved_activation_bytes(lambda: lora(x), exclude=lora.parameters())
    mine = saved_activation_bytes(lambda: ours(x), exclude=[*ours.parameters(), *ours.buffers()])
    assert mine <= theirs
    tokens_r = 4 * 32 * 8 * 4  # h = x Aᵀ, tokens × r in fp32
    assert mine == (tokens_r + x.numel() * 4 if train_A else tokens_r)  # x only when dA needs it


def test_complement_stored_basis_behaves_like_the_basis():
    from kplora_kernels.subspace.sketch import complement_basis

    V = random_basis(16, 11, torch.float32)
    plain, compl = make_layer(dtype=torch.float32, train_A=True), make_layer(dtype=torch.float32, train_A=True)
    plain.set_bases(V=V)
    compl.set_bases(V=complement_basis(V), V_complement=True)
    assert compl.k_in == 11 and compl.V.shape == (16, 5) and "complement stored" in repr(compl)
    torch.testing.assert_close(compl.lora_A @ compl.lora_A.T, torch.eye(4), atol=1e-5, rtol=0)
    assert (compl.lora_A @ V).abs().max() < 1e-5
    with torch.no_grad():
        compl.lora_A.copy_(plain.lora_A)
        compl.lora_B.copy_(plain.lora_B)
    x = torch.randn(6, 16)
    for layer in (plain, compl):
        layer(x).pow(2).sum().backward()
    torch.testing.assert_close(compl.lora_A.grad, plain.lora_A.grad, atol=1e-5, rtol=1e-5)
    with raises(ValueError, "span(V)"):
        compl.reset_adapter(torch.randn(4, 16))
    with raises(ValueError, "residual space of 3"):
        compl.set_bases(V=random_basis(16, 3, torch.float32), V_complement=True)
    state = compl.state_dict()
    fresh = FusedKeepLoRALinear(16, 12, rank=4)
    fresh.load_state_dict(state)
    assert fresh.V_complement and fresh.k_in == 11


# --- bad input: every argument, value and state a user can get wrong ---------------------------------

@pytest.mark.parametrize("kwargs, exc, fragments", [
    (dict(rank=2.0), TypeError, ("rank", "int", "float")),
    (dict(rank=True), TypeError, ("rank", "bool")),
    (dict(rank="4"), TypeError, ("rank", "str")),
    (dict(rank=2, dropout="0.1"), TypeError, ("dropout", "str", "'0.1'")),
    (dict(rank=2, dropout=None), TypeError, ("dropout", "NoneType")),
    (dict(rank=2, dropout=float("nan")), ValueError, ("dropout", "nan")),
    (dict(rank=2, dropout=-0.1), ValueError, ("dropout", "-0.1")),
    (dict(rank=2, alpha="1"), TypeError, ("alpha", "str")),
    (dict(rank=2, alpha=float("inf")), ValueError, ("alpha", "inf")),
    (dict(rank=2, layer_scale=None), TypeError, ("layer_scale", "NoneType")),
    (dict(rank=2, layer_scale=float("nan")), ValueError, ("layer_scale", "nan")),
    (dict(rank=2, train_A="yes"), TypeError, ("train_A", "bool", "'yes'")),
], ids=lambda v: repr(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]!r}" for k in v))
def test_constructor_argument_types_and_values(kwargs, exc, fragments):
    with raises(exc, *fragments):
        FusedKeepLoRALinear(16, 12, **kwargs)
    with raises(exc, *fragments):
        FusedKeepLoRALinear.from_linear(nn.Linear(16, 12), **kwargs)


@pytest.mark.parametrize("weight_dtype, input_dtype", [(torch.float32, torch.float16), (torch.float32, torch.float64),
                                                       (torch.bfloat16, torch.float32), (torch.float64, torch.float32)],
                         ids=str)
def test_input_dtype_other_than_the_weight_is_refused_naming_both(weight_dtype, input_dtype):
    layer = make_layer(dtype=weight_dtype)
    with raises(TypeError, "input", str(input_dtype), str(weight_dtype), "autocast"):
        layer(torch.randn(3, 16, dtype=input_dtype))
    layer.merge_()  # the merged path too
    with raises(TypeError, str(input_dtype), str(weight_dtype)):
        layer(torch.randn(3, 16, dtype=input_dtype))


def test_fp16_input_under_autocast_is_allowed():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.to(torch.bfloat16))
    torch.testing.assert_close(y.float(), plain(layer, x).detach(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("with_V", [False, True])
def test_reset_adapter_refuses_non_finite_A(bad, with_V):
    layer = make_layer(dtype=torch.float32)
    V = random_basis(16, 5, torch.float32)
    if with_V:
        layer.set_bases(V=V)
    A = orthogonal_rows(4, V.double()).float()
    A[1, 3] = bad
    before = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
    with raises(ValueError, "A", "finite", "1 of its 64"):
        layer.reset_adapter(A)
    assert torch.equal(layer.lora_A, before[0]) and torch.equal(layer.lora_B, before[1])


@pytest.mark.parametrize("side", ["V", "U"])
def test_set_bases_refuses_non_finite_bases(side):
    layer = make_layer(dtype=torch.float32)
    B = random_basis(16 if side == "V" else 12, 3, torch.float32)
    B[0, 0] = float("nan")
    with raises(ValueError, side, "finite"):
        layer.set_bases(**{side: B})
    assert layer.V.shape[1] == 0 and layer.U.shape[1] == 0


def _leak(A, V):
    """max over rows of |a V| / |a| in fp64."""
    A, V = A.double(), V.double()
    return ((A @ V).norm(dim=1) / A.norm(dim=1)).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("inside", ["all", "one", "two", "duplicate"])
def test_set_bases_fills_directions_that_lie_inside_the_new_basis(dtype, inside):
    """issue 14 item 4: a plain QR of ``A (I − VVᵀ)`` returns directions inside span(V) when A's rows
    lie there; the layer must replace them by residual directions and keep the others."""
    layer = make_layer(dtype=dtype)
    V = random_basis(16, 6, dtype, seed=3)
    outside = orthogonal_rows(4, V.double(), seed=2).to(dtype)
    A = outside.clone()
    if inside == "all":  # a basis grown over the adapter's own directions
        A = (V[:, :4] + 0.0).T.contiguous()
    elif inside == "one":
        A[2] = V[:, 1]
    elif inside == "two":
        A[0], A[2] = V[:, 1], V[:, 0] - V[:, 4]
    else:  # two equal rows: the second is lost to the first
        A[3] = A[0]
    with torch.no_grad():
        layer.lora_A.copy_(A)
    layer.set_bases(V=V)
    new = layer.lora_A.detach()
    assert _leak(new, V) < 16 * torch.finfo(dtype).eps ** 0.5 * (1e-3 if dtype == torch.float64 else 1), _leak(new, V)
    torch.testing.assert_close(new.double() @ new.double().T, torch.eye(4, dtype=torch.float64),
                               atol=10 * torch.finfo(dtype).eps, rtol=0)
    kept = {"all": [], "one": [0, 1, 3], "two": [1, 3], "duplicate": [0, 1, 2]}[inside]
    for j in kept:  # rows already outside span(V) (and independent of earlier rows) are unchanged
        torch.testing.assert_close(new[j], outside[j], atol=10 * torch.finfo(dtype).eps, rtol=0)
    # and reset_adapter accepts what set_bases produced
    layer.reset_adapter(new.clone())


def test_set_bases_keeps_an_adapter_already_outside_the_basis():
    layer = make_layer(dtype=torch.float64)
    V = random_basis(16, 5)
    A = orthogonal_rows(4, V)
    with torch.no_grad():
        layer.lora_A.copy_(A)
    layer.set_bases(V=V)
    torch.testing.assert_close(layer.lora_A.detach(), A, atol=1e-14, rtol=0)  # signs kept too


def test_set_bases_fills_inside_directions_with_a_complement_stored_basis():
    from kplora_kernels.subspace.sketch import complement_basis

    layer = make_layer(dtype=torch.float32)
    V = random_basis(16, 10, torch.float32)
    with torch.no_grad():
        layer.lora_A.copy_(V[:, :4].T)
    layer.set_bases(V=complement_basis(V), V_complement=True)
    assert _leak(layer.lora_A.detach(), V) < 1e-5


def _layer_state(layer):
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in layer.state_dict().items()}
    return state, (layer.merged, layer.V_complement, layer.alpha, layer.layer_scale)


def _assert_unchanged(layer, before):
    state, flags = _layer_state(layer)
    assert flags == before[1]
    assert state.keys() == before[0].keys()
    for k, v in state.items():
        assert torch.equal(v, before[0][k]), k


def _bad_states(good):
    bad = []

    def variant(label, exc, fragments, **changes):
        state = dict(good)
        for k, v in changes.items():
            if v is None:
                state.pop(k)
            else:
                state[k] = v
        bad.append((label, state, exc, fragments))

    nan_B = good["lora_B"].clone()
    nan_B[0, 0] = float("nan")
    extra = good["_extra_state"].clone()
    extra[2] = 3  # another rank
    variant("other rank", ValueError, ("rank 3",), _extra_state=extra)
    variant("lora_A shape", ValueError, ("lora_A", "(4, 16)", "(4, 15)"), lora_A=torch.zeros(4, 15))
    variant("weight shape", ValueError, ("weight", "(12, 16)", "(16, 12)"), weight=torch.zeros(16, 12))
    variant("V rows", ValueError, ("V", "16 rows"), V=random_basis(15, 3, torch.float32))
    variant("V not orthonormal", ValueError, ("V", "orthonormal"), V=2 * random_basis(16, 3, torch.float32))
    variant("V no room", ValueError, ("V", "residual space of 2"), V=random_basis(16, 14, torch.float32))
    variant("NaN lora_B", ValueError, ("lora_B", "finite"), lora_B=nan_B)
    variant("extra state junk", ValueError, ("_extra_state",), _extra_state=torch.zeros(2))
    variant("extra state not a tensor", ValueError, ("_extra_state",), _extra_state="merged")
    variant("missing key", RuntimeError, ("Missing key", "lora_A"), lora_A=None)
    variant("unexpected key", RuntimeError, ("Unexpected key", "lora_C"), lora_C=torch.zeros(2))
    return bad


def test_failed_load_state_dict_leaves_the_layer_unchanged():
    source = make_layer(dtype=torch.float32)
    V = random_basis(16, 5, torch.float32)
    source.set_bases(V=V, U=random_basis(12, 2, torch.float32))
    source.merge_()
    good = source.state_dict()
    cases = _bad_states(good)
    assert len(cases) == 11
    for label, state, exc, fragments in cases:
        layer = make_layer(dtype=torch.float32)
        layer.set_bases(V=random_basis(16, 2, torch.float32, seed=7))
        before = _layer_state(layer)
        with raises(exc, *fragments):
            layer.load_state_dict(state)
        _assert_unchanged(layer, before)
        # inside a model too: the layer is untouched
        model = nn.Sequential(layer)
        with raises(exc, *fragments):
            model.load_state_dict({f"0.{k}": v for k, v in state.items()})
        _assert_unchanged(layer, before)
    layer = make_layer(dtype=torch.float32)
    layer.load_state_dict(good)  # and the good one loads
    assert layer.merged and layer.V.shape == (16, 5)


def test_extra_state_is_a_tensor_and_the_old_dict_form_loads():
    from safetensors.torch import load_file, save_file

    layer = make_layer(dtype=torch.float32)
    layer.set_bases(V=random_basis(16, 11, torch.float32)[:, 6:], V_complement=True)
    layer.merge_()
    state = layer.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(d, "layer.safetensors"))
        loaded = load_file(os.path.join(d, "layer.safetensors"))
    fresh = FusedKeepLoRALinear(16, 12, rank=4)
    fresh.load_state_dict(loaded)
    assert fresh.merged and fresh.V_complement and fresh.scaling == layer.scaling
    old = dict(state)
    old["_extra_state"] = {"merged": True, "rank": 4, "alpha": 2.0, "layer_scale": 0.5, "V_complement": True}
    fresh = FusedKeepLoRALinear(16, 12, rank=4)
    fresh.load_state_dict(old)
    assert fresh.merged and fresh.V_complement and fresh.scaling == layer.scaling


@pytest.mark.parametrize("merged", [False, True])
def test_to_linear_folds_the_adapter_and_restores_the_class(merged):
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    base = NonDynamicallyQuantizableLinear(16, 12, dtype=torch.float64)
    layer = FusedKeepLoRALinear.from_linear(base, 4, 2.0, 0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    if merged:
        layer.merge_()
    x = torch.randn(5, 16, dtype=torch.float64)
    expected = layer(x)
    linear = layer.to_linear()
    assert type(linear) is NonDynamicallyQuantizableLinear and linear.weight is layer.weight
    torch.testing.assert_close(linear(x), expected, atol=1e-12, rtol=0)
    assert set(linear.state_dict()) == {"weight", "bias"}


def test_set_bases_fills_inside_directions_with_a_bf16_basis():
    """A bf16 basis is orthonormal only to ~4e-3: rows inside its span must still be replaced."""
    layer = make_layer(in_f=64, dtype=torch.float32)
    V = random_basis(64, 30, torch.bfloat16, seed=4)
    with torch.no_grad():
        layer.lora_A.copy_(V[:, :4].float().T)
    layer.set_bases(V=V)
    A = layer.lora_A.detach()
    inside = A - layer.project_input_side(A)  # against the stored (bf16-rounded) basis
    assert inside.norm(dim=1).max() < 1e-4
    torch.testing.assert_close(A @ A.T, torch.eye(4), atol=1e-5, rtol=0)


def test_from_linear_keeps_eval_mode():
    layer = FusedKeepLoRALinear.from_linear(nn.Linear(16, 12).eval(), 4, dropout=0.5)
    assert not layer.training
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), plain(layer, x))  # no dropout in eval mode


def test_accumulators_optimizer_device_and_flag_errors():
    layer = make_layer(dtype=torch.float32)
    with raises(TypeError, "grad_accumulator", "update(dY, X)", "list"):
        layer.grad_accumulator = []
    with raises(TypeError, "input_accumulator", "update(X)", "int"):
        layer.input_accumulator = 3
    layer.grad_accumulator, layer.input_accumulator = DenseGradient(), Inputs()  # objects with update()
    layer.grad_accumulator = layer.input_accumulator = None
    with raises(TypeError, "optimizer", "torch.optim.Optimizer", "list"):
        layer.register_projection_hook([layer.lora_B])
    with raises(TypeError, "optimizer", "Optimizer", "str"):
        register_projection_hooks(nn.Sequential(layer), "adamw")
    with raises(TypeError, "model", "nn.Module", "dict"):
        register_projection_hooks({}, torch.optim.SGD([layer.lora_B], lr=0.1))
    with raises(ValueError, "input is on meta", "cpu"):
        layer(torch.randn(3, 16, device="meta"))
    with raises(TypeError, "V_complement", "bool", "'yes'"):
        layer.set_bases(V=random_basis(16, 3, torch.float32), V_complement="yes")
    assert layer.V.shape[1] == 0


def test_set_bases_with_one_bad_side_changes_neither():
    layer = make_layer(dtype=torch.float32)
    A = layer.lora_A.detach().clone()
    with raises(ValueError, "U", "orthonormal"):
        layer.set_bases(V=random_basis(16, 3, torch.float32), U=3 * random_basis(12, 2, torch.float32))
    with raises(ValueError, "residual space of 2"):
        layer.set_bases(V=random_basis(16, 14, torch.float32), U=random_basis(12, 2, torch.float32))
    assert layer.V.shape[1] == 0 and layer.U.shape[1] == 0 and torch.equal(layer.lora_A, A)
