"""Datasets of the classification experiments: where their files are, and the splits used.

The folder rules (which sub-folders of ``--data-dir`` hold a dataset) live here
and nowhere else; the file formats are read by :mod:`curveball_experiments.readers`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from curveball_experiments import readers


def _has_mnist(folder: Path) -> bool:
    """Whether ``folder`` holds the images of either split, by the readers' own file rules."""
    return any(readers.mnist_files(folder, split)[0] is not None for split in ("test", "train"))


def find_mnist(data_dir: Path | str | None) -> Path | None:
    """The folder holding the MNIST IDX files: ``data_dir`` itself or its ``mnist/``."""
    if data_dir is None:
        return None
    root = Path(data_dir)
    for folder in (root, root / "mnist", root / "MNIST"):
        if _has_mnist(folder):
            return folder
    return None


def find_cifar10(data_dir: Path | str | None) -> Path | None:
    """The ``cifar-10-batches-py`` folder under ``data_dir`` (or ``data_dir/cifar10``)."""
    if data_dir is None:
        return None
    root = Path(data_dir)
    candidates = [root, root / "cifar-10-batches-py", root / "cifar10"]
    candidates.append(root / "cifar10" / "cifar-10-batches-py")
    for folder in candidates:
        if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
            return folder
    return None


def find_imagenet(data_dir: Path | str | None) -> Path | None:
    """An ImageNet-style folder (``train/<class>/<images>``) under ``data_dir``."""
    if data_dir is None:
        return None
    root = Path(data_dir)
    for folder in (root / "imagenet", root / "ILSVRC2012", root):
        train = folder / "train"
        if train.is_dir() and any(p.is_dir() for p in train.iterdir()):
            return folder
    return None


@dataclass
class Dataset:
    """In-memory training and validation tensors of one task."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    num_classes: int
    note: str = ""

    def subset(self, train: int | None, val: int | None) -> Dataset:
        """The first ``train`` / ``val`` examples (``None``: all)."""
        return Dataset(
            self.name,
            self.x_train[:train],
            self.y_train[:train],
            self.x_val[:val],
            self.y_val[:val],
            self.num_classes,
            self.note,
        )

    def describe(self) -> str:
        shape = "x".join(str(s) for s in self.x_train.shape[1:])
        return (
            f"{self.name}: {len(self.x_train)} training and {len(self.x_val)} validation "
            f"images of {shape}, {self.num_classes} classes"
        )


def load_mnist_dataset(folder: Path) -> Dataset:
    """MNIST via ``readers.mnist_splits``.

    With only the official test files, their first 8,000 images train and the last
    2,000 validate; a smaller test file (a test fixture) is split 80/20 instead.
    """

    try:
        splits = readers.mnist_splits(folder)
    except ValueError:
        n = len(readers.load_mnist(folder, "test")[1])
        train = (4 * n) // 5
        splits = readers.mnist_splits(folder, train_size=train, val_size=n - train)
    return Dataset(
        "MNIST",
        splits["x_train"],
        splits["y_train"],
        splits["x_val"],
        splits["y_val"],
        10,
        splits["note"],
    )


def load_cifar10_dataset(folder: Path) -> Dataset:
    """CIFAR-10: training batches for training, ``test_batch`` for validation."""

    d = readers.load_cifar10(folder)
    note = f"CIFAR-10 from {folder}: data_batch_1..5 for training, test_batch for validation."
    return Dataset("CIFAR-10", d["x_train"], d["y_train"], d["x_test"], d["y_test"], 10, note)


def load_imagenet_dataset(
    folder: Path, image_size: int, classes: int | None, max_per_class: int | None
) -> Dataset:
    """An ImageNet-style folder; ``val/`` for validation when it exists, else 10% of
    every class of ``train/``. Inputs are standardised with the training mean/std."""

    x, y, names = readers.load_image_folder(
        folder, image_size, classes, split="train", max_per_class=max_per_class
    )
    if (folder / "val").is_dir():
        xv, yv, _ = readers.load_image_folder(
            folder, image_size, classes, split="val", max_per_class=max_per_class
        )
        how = "train/ for training, val/ for validation"
    else:
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(y), generator=g)
        cut = max(1, len(y) // 10)
        xv, yv, x, y = x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]
        how = "no val/ folder: a fixed random 10% of train/ for validation"
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    note = (
        f"ImageNet-style folder {folder}: {len(names)} classes, images centre-cropped and "
        f"resized to {image_size}x{image_size}; {how}."
    )
    return Dataset("ImageNet", (x - mean) / std, y, (xv - mean) / std, yv, len(names), note)


def synthetic_dataset(seed: int = 0, train: int = 4000, val: int = 1000) -> Dataset:
    """A built-in 10-class task of 1x16x16 images (no download needed).

    Each class has a fixed random smooth template (Gaussian noise blurred by a 5x5
    box filter, scaled to unit variance); an example is its class template plus
    i.i.d. ``N(0, 1)`` pixel noise.
    """
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(10, 1, 20, 20, generator=g)
    templates = F.avg_pool2d(raw, 5, stride=1)
    templates = (templates - templates.mean()) / templates.std()

    def sample(count: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, 10, (count,), generator=g)
        x = templates[y] + torch.randn(count, 1, 16, 16, generator=g)
        return x, y

    x_train, y_train = sample(train)
    x_val, y_val = sample(val)
    note = (
        "Synthetic task (no MNIST given): 10 classes of 1x16x16 images, class template "
        f"(blurred Gaussian noise) plus N(0, 1) pixel noise; {train} training and {val} "
        "validation examples."
    )
    return Dataset("synthetic", x_train, y_train, x_val, y_val, 10, note)


def default_data_dir(value: str | None) -> str | None:
    """``--data-dir`` or the ``CURVEBALL_DATA`` environment variable."""
    return value or os.environ.get("CURVEBALL_DATA") or None
