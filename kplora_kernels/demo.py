"""A small, real continual-learning run on the reference path (the full ``kplora demo`` of the
roadmap replaces it): a two-layer MLP learns digits 0–4, then digits 5–9, once with plain
fine-tuning and once with every weight gradient confined to the residual subspace of the first
task's inputs (GPM bases, layer scaling). Data: scikit-learn's bundled 8×8 digits, no download.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from . import gpm_expand, layer_scales, residual_project

TASKS = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))


def load_digits_tasks(seed: int):
    """Per task: (x_train, y_train, x_test, y_test), labels local to the task's own classes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for classes in TASKS:
        idx = torch.nonzero(torch.isin(y, torch.tensor(classes))).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        split = int(0.7 * len(idx))
        local = y[idx] - classes[0]
        tasks.append((x[idx[:split]], local[:split], x[idx[split:]], local[split:]))
    return tasks


class MLP(nn.Module):
    def __init__(self, hidden: int = 128):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(64, hidden), nn.Linear(hidden, 10)])

    def forward(self, x, task: int):
        h = torch.relu(self.layers[0](x))
        return self.layers[1](h)[:, 5 * task:5 * task + 5]  # each task keeps its own label space

    def layer_inputs(self, x):
        """The input of every linear layer for the batch ``x`` (what GPM protects)."""
        return [x, torch.relu(self.layers[0](x))]


def accuracy(model, data, task) -> float:
    with torch.no_grad():
        return (model(data[2], task).argmax(1) == data[3]).float().mean().item()


def train(model, data, task, steps, bases=None, scales=None, lr=0.05):
    """Full-batch SGD with momentum on the weights (biases frozen). With ``bases``, each weight
    gradient is projected to ``s_l·G (I − V_l V_lᵀ)`` before the step; momentum keeps it there."""
    weights = [layer.weight for layer in model.layers]
    opt = torch.optim.SGD(weights, lr=lr, momentum=0.9)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(data[0], task), data[1])
        opt.zero_grad()
        loss.backward()
        if bases is not None:
            for w, V, s in zip(weights, bases, scales):
                w.grad = residual_project(w.grad, V=V, scale=s)
        opt.step()


def run(steps: int = 300, seed: int = 0, eps_f: float = 0.97, hidden: int = 128) -> dict:
    torch.manual_seed(seed)
    start = time.perf_counter()
    tasks = load_digits_tasks(seed)
    base = MLP(hidden)
    for p in base.parameters():
        p.requires_grad_(False)
    for layer in base.layers:
        layer.weight.requires_grad_(True)
    train(base, tasks[0], 0, steps)
    with torch.no_grad():
        bases = [gpm_expand(None, x, eps_f) for x in base.layer_inputs(tasks[0][0])]
    scales = layer_scales(len(bases))
    print(f"task 0 (digits 0-4) learned: accuracy {accuracy(base, tasks[0], 0):.3f}")
    print("protected input bases (GPM, eps_f=%.2f): %s" % (
        eps_f, ", ".join(f"layer {i}: {V.shape[1]}/{V.shape[0]}" for i, V in enumerate(bases))))
    print("layer scales: " + ", ".join(f"{s:.2f}" for s in scales))
    results = {}
    for method in ("plain fine-tuning", "residual subspace"):
        model = copy.deepcopy(base)
        train(model, tasks[1], 1, steps, *((bases, scales) if method == "residual subspace" else (None, None)))
        drift = max(((m.weight - b.weight) @ V).abs().max().item()
                    for m, b, V in zip(model.layers, base.layers, bases))
        results[method] = {"task0": accuracy(model, tasks[0], 0), "task1": accuracy(model, tasks[1], 1),
                           "max_update_on_protected_inputs": drift}
    print(f"\nafter learning task 1 (digits 5-9) for {steps} steps:")
    print(f"{'method':<20}{'task 0 acc':>12}{'task 1 acc':>12}{'max |ΔW V|':>14}")
    for method, r in results.items():
        print(f"{method:<20}{r['task0']:>12.3f}{r['task1']:>12.3f}{r['max_update_on_protected_inputs']:>14.2e}")
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return results
