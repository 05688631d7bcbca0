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
