"""The demo's domains: real 8×8 digit images (scikit-learn's bundled copy) and, on request,
Fashion-MNIST (resized to 8×8) from the Debian package ``dataset-fashion-mnist``.

The base domain ("pre-trained knowledge") is digit names; each task is a new label space with
its own class names, on digits (parity, magnitude, loops) or on clothing groups.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .idx import read_idx

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot"]


@dataclass
class Domain:
    """Images ``(n, 1, 8, 8)`` in [0, 1], labels into ``class_names``, split into train and test."""

    name: str
    class_names: list
    prompt: str  # a format string with {}
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _split(name, class_names, prompt, x, y, seed, test_fraction=0.3):
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    cut = int(len(y) * (1 - test_fraction))
    return Domain(name, class_names, prompt, x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]])


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(d.target)


def fashion_available(root: str = FASHION_DIR) -> bool:
    return os.path.isfile(os.path.join(root, "train-images-idx3-ubyte.gz"))


def _fashion(root: str, limit: int):
    images = read_idx(os.path.join(root, "train-images-idx3-ubyte.gz"))[:limit]
    labels = read_idx(os.path.join(root, "train-labels-idx1-ubyte.gz"))[:limit]
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0
    x = torch.nn.functional.adaptive_avg_pool2d(x, 8)  # 28×28 → 8×8, like the digits
    return x, torch.tensor(labels, dtype=torch.long)


def build_domains(seed: int = 0, use_fashion: bool = False, fashion_root: str = FASHION_DIR,
                  fashion_limit: int = 6000):
    """Returns ``(base, tasks, source)``: the base domain, the task sequence, and a line saying
    which data were used. The digits give parity, magnitude, loops and mirrored digits;
    ``use_fashion=True`` replaces the mirrored digits by two clothing tasks (footwear, tops) from
    the first ``fashion_limit`` Fashion-MNIST training images under ``fashion_root``, and raises
    ``FileNotFoundError`` when they are not there. Nothing depends on what happens to be installed."""
    x, y = _digits()
    base = _split("digit names", DIGIT_NAMES, "a photo of the number {}.", x, y, seed)
    loops = torch.tensor([1, 0, 0, 0, 0, 0, 1, 0, 1, 1])
    tasks = [
        _split("parity", ["even number", "odd number"], "a photo of an {}.", x, y % 2, seed + 1),
        _split("magnitude", ["small number", "large number"], "a photo of a {}.", x, (y >= 5).long(), seed + 2),
        _split("loops", ["digit without a loop", "digit with a loop"], "a photo of a {}.", x, loops[y], seed + 3),
    ]
    if use_fashion:
        if not fashion_available(fashion_root):
            raise FileNotFoundError(f"Fashion-MNIST not found: expected {fashion_root}/train-images-idx3-ubyte.gz "
                                    "(Debian package dataset-fashion-mnist)")
        fx, fy = _fashion(fashion_root, fashion_limit)
        for name, classes in (("footwear", [5, 7, 9]), ("tops", [0, 2, 4, 6])):
            keep = torch.isin(fy, torch.tensor(classes))
            remap = {c: i for i, c in enumerate(classes)}
            labels = torch.tensor([remap[int(v)] for v in fy[keep]])
            tasks.append(_split(name, [FASHION_NAMES[c] for c in classes], "a photo of a {}.", fx[keep], labels,
                                seed + 10 + len(tasks)))
        source = f"sklearn digits and Fashion-MNIST from {fashion_root} (fashion: true)"
    else:
        mirrored = torch.flip(x, dims=[3])
        tasks.append(_split("mirror", [f"mirrored {n}" for n in DIGIT_NAMES], "a photo of a {}.", mirrored, y,
                            seed + 4))
        source = "sklearn digits only (fashion: false, the default)"
    return base, tasks, source
