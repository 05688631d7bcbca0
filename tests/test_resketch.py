"""end_task's report and the re-sketch rule (issue 27 item 1): a randomized input sketch that runs out
of width short of eps_f gets further data passes over the residual of the grown basis, up to
``max_sketch_passes``; end_task reports the passes and each layer's growth."""
import pytest
import torch
from torch import nn

from helpers import raises
from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig
from test_methods import MLP, config, make_task, protected, task_loss, train


def _protected_dims(layer) -> int:
    return protected(layer).shape[1]


def test_end_task_reports_every_layers_growth_with_exact_sketches():
    kl = KeepLoRA(MLP(), config("keeplora++"), progress=False)
    batch = make_task(0)
    before = {n: _protected_dims(layer) for n, layer in kl.layers.items()}
    kl.begin_task([batch], task_loss)
    train(kl, batch, steps=3)
    report = kl.end_task([batch], task_loss)
    assert report.task == 0 and report.passes == 1 and list(report.layers) == list(kl.layers)
    for name, layer in kl.layers.items():
        growth = report.layers[name]
        assert growth.appended == _protected_dims(layer) - before[name], name
        assert growth.passes == 1 and growth.width is None and not growth.saturated, name
    assert report.layers["layers.0"].appended > 0  # the task's 5 input directions are new to layer 0
    assert report.under_protected == []


def test_methods_that_grow_no_basis_report_no_pass():
    kl = KeepLoRA(MLP(), config("lora"), progress=False)
    batch = make_task(0)
    kl.begin_task([batch], task_loss)
    report = kl.end_task([batch], task_loss)
    assert report.task == 0 and report.passes == 0 and report.layers == {}


@pytest.mark.parametrize("value,exc", [(0, ValueError), (65, ValueError), (2.0, TypeError), (True, TypeError)])
def test_max_sketch_passes_is_checked(value, exc):
    with raises(exc, "max_sketch_passes"):
        KeepLoRAConfig(max_sketch_passes=value)


# --- the regression: a layer wider than its sketch budget, inputs spanning more than the width ---------

DIM, WIDTH, SPAN = 64, 8, 40


class Wide(nn.Module):
    """One adapted linear of DIM inputs (its sketch is randomized: 4·DIM² bytes exceed the budget)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(DIM, 6)])

    def forward(self, x):
        return self.layers[0](x)


def _wide_inputs(batches=4, n=128):
    """Inputs in a SPAN-dimensional subspace with a slowly decaying spectrum: eps_f = 0.99 needs
    about 35 directions, more than four times the sketch's width."""
    gen = torch.Generator().manual_seed(7)
    basis = torch.linalg.qr(torch.randn(DIM, SPAN, generator=gen, dtype=torch.float64))[0]
    scales = torch.linspace(1.0, 0.3, SPAN, dtype=torch.float64)
    return [((torch.randn(n, SPAN, generator=gen, dtype=torch.float64) * scales) @ basis.T).float()
            for _ in range(batches)]


def _loss(model, x):
    return model(x).pow(2).mean()


def _captured(X: torch.Tensor, layer) -> float:
    """The fraction of ``‖X‖_F²`` inside the layer's protected input subspace, in float64."""
    X = X.double()
    return float((X @ protected(layer)).pow(2).sum() / X.pow(2).sum())


@pytest.mark.parametrize("residual_energy", ["auto", "exact"])
def test_a_layer_wider_than_its_sketch_gets_its_inputs_protected_to_eps_f(residual_energy):
    cfg = KeepLoRAConfig(method="inflora", rank=2, eps_f=0.99, targets=[r"^layers\.0$"],
                         sketch_memory_budget=4 * DIM * WIDTH, residual_energy=residual_energy)
    kl = KeepLoRA(Wide(), cfg, progress=False)
    data = _wide_inputs()
    kl.begin_task(data, _loss)
    report = kl.end_task(data, _loss)
    layer = kl.layers["layers.0"]
    captured = _captured(torch.cat(data), layer)
    growth = report.layers["layers.0"]
    assert captured >= cfg.eps_f, (captured, report)
    assert growth.width == WIDTH and not growth.saturated and report.under_protected == []
    assert report.passes == growth.passes > SPAN // 2 // WIDTH, report  # one pass appends at most the width
    assert growth.appended == _protected_dims(layer) > WIDTH
    assert growth.energy >= cfg.eps_f and growth.energy <= captured + 1e-3, (growth.energy, captured)


def test_the_pass_bound_warns_naming_the_layer_width_and_energy(caplog):
    cfg = KeepLoRAConfig(method="inflora", rank=2, eps_f=0.99, targets=[r"^layers\.0$"],
                         sketch_memory_budget=4 * DIM * WIDTH, max_sketch_passes=2)
    kl = KeepLoRA(Wide(), cfg, progress=False)
    data = _wide_inputs()
    kl.begin_task(data, _loss)
    with caplog.at_level("WARNING", logger="kplora_kernels"):
        report = kl.end_task(data, _loss)
    growth = report.layers["layers.0"]
    captured = _captured(torch.cat(data), kl.layers["layers.0"])
    assert report.passes == 2 and growth.saturated and report.under_protected == ["layers.0"]
    assert growth.appended == 2 * WIDTH and captured < cfg.eps_f
    message = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "'layers.0'" in message and f"width {WIDTH}" in message and f"{growth.energy:.4f}" in message, message
    assert "max_sketch_passes" in message
