"""Fixtures for the experiment tests: tiny data sets in the official on-disk formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte array as a gzip-compressed IDX file."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_mnist(folder: Path, n_test: int = 64, n_train: int | None = None) -> Path:
    """MNIST-like IDX files (random images whose mean brightness follows the label)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    splits = [("t10k", n_test)] + ([("train", n_train)] if n_train else [])
    for prefix, n in splits:
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 100, size=(n, 28, 28)) + 15 * labels[:, None, None]
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images.astype(np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def write_cifar10(root: Path, per_batch: int = 8) -> Path:
    """A ``cifar-10-batches-py`` folder with ``per_batch`` images in every batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, size=per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def write_image_folder(root: Path, classes: int = 2, per_class: int = 4) -> Path:
    """``imagenet/{train,val}/<class>/*.png`` with small random images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    base = root / "imagenet"
    for split in ("train", "val"):
        for c in range(classes):
            folder = base / split / f"n0000{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class if split == "train" else 2):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.png")
    return base


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """A data folder with MNIST (under ``mnist/``), CIFAR-10 and an image folder."""
    root = tmp_path / "data"
    write_mnist(root / "mnist", n_test=32, n_train=64)
    write_cifar10(root)
    write_image_folder(root)
    return root


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CURVEBALL_DATA", raising=False)
