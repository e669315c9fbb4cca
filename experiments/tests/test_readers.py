"""Tests for the dataset loaders of ``curveball_experiments.readers``.

The tests write tiny files in the official formats themselves; no real data set
is needed.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from curveball_experiments import readers as data

# ---------------------------------------------------------------------------
# IDX / MNIST
# ---------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    """Serialise an unsigned-byte array in the IDX format."""
    assert array.dtype == np.uint8
    header = struct.pack(">HBB", 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    payload = _idx_bytes(array)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def _write_mnist(
    folder: Path, prefix: str, n: int, seed: int, compress: bool
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    _write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
    _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = _write_idx(tmp_path / "a-idx3-ubyte", array, compress)
    out = data.read_idx(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)


def test_read_idx_other_dtype(tmp_path: Path) -> None:
    array = np.array([[1.5, -2.0], [3.25, 4.0]], dtype=">f4")
    path = tmp_path / "f.idx"
    path.write_bytes(struct.pack(">HBB2I", 0, 0x0D, 2, 2, 2) + array.tobytes())
    np.testing.assert_array_equal(data.read_idx(path), array.astype(np.float32))


@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist_round_trip(tmp_path: Path, compress: bool) -> None:
    images, labels = _write_mnist(tmp_path, "t10k", 7, seed=0, compress=compress)
    x, y = data.load_mnist(tmp_path, "test")
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (7,) and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    np.testing.assert_array_equal(np.rint(x.squeeze(1).numpy() * 255).astype(np.uint8), images)
    np.testing.assert_array_equal(y.numpy(), labels.astype(np.int64))


def test_load_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        data.load_mnist(tmp_path, "test")
    _write_mnist(tmp_path, "train", 3, seed=0, compress=False)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        data.load_mnist(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        data.load_mnist(tmp_path, "valid")


def test_load_mnist_truncated_raw(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "t10k", 4, seed=1, compress=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*truncated"):
        data.load_mnist(tmp_path)


def test_load_mnist_truncated_gzip(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "t10k", 4, seed=1, compress=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        data.load_mnist(tmp_path)


def test_load_mnist_bad_magic_and_dims(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "t10k", 3, seed=2, compress=False)
    images = tmp_path / "t10k-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*magic"):
        data.load_mnist(tmp_path)
    # labels file in place of the images file: wrong number of dimensions
    images.write_bytes((tmp_path / "t10k-labels-idx1-ubyte").read_bytes())
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*dimension"):
        data.load_mnist(tmp_path)
    # 3x(14x56) images: right size, wrong image dimensions
    _write_idx(images, np.zeros((3, 14, 56), dtype=np.uint8), compress=False)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*28x28"):
        data.load_mnist(tmp_path)
    # count mismatch between images and labels
    _write_idx(images, np.zeros((2, 28, 28), dtype=np.uint8), compress=False)
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        data.load_mnist(tmp_path)


def test_mnist_splits_test_only(tmp_path: Path) -> None:
    images, labels = _write_mnist(tmp_path, "t10k", 10, seed=3, compress=True)
    splits = data.mnist_splits(tmp_path, train_size=6, val_size=3)
    assert "first 6" in splits["note"] and "last 3" in splits["note"]
    assert splits["x_train"].shape == (6, 1, 28, 28)
    assert splits["x_val"].shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(splits["y_train"].numpy(), labels[:6])
    np.testing.assert_array_equal(splits["y_val"].numpy(), labels[7:])
    with pytest.raises(ValueError, match="cannot take"):
        data.mnist_splits(tmp_path, train_size=8000, val_size=2000)


def test_mnist_splits_official_train(tmp_path: Path) -> None:
    _, test_labels = _write_mnist(tmp_path, "t10k", 4, seed=4, compress=False)
    _, train_labels = _write_mnist(tmp_path, "train", 5, seed=5, compress=True)
    splits = data.mnist_splits(tmp_path)
    assert "official training set" in splits["note"]
    np.testing.assert_array_equal(splits["y_train"].numpy(), train_labels)
    np.testing.assert_array_equal(splits["y_val"].numpy(), test_labels)


# ---------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------


def _write_cifar(folder: Path, n: int = 4, seed: int = 0) -> dict[str, tuple]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        batch = {b"batch_label": name.encode(), b"data": images, b"labels": labels}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = (images, labels)
    return written


@pytest.mark.parametrize("parent", [False, True])
def test_load_cifar10(tmp_path: Path, parent: bool) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    written = _write_cifar(folder)
    out = data.load_cifar10(tmp_path if parent else folder, normalize=False)
    assert out["x_train"].shape == (20, 3, 32, 32) and out["x_train"].dtype == torch.float32
    assert out["y_train"].dtype == torch.int64 and out["y_train"].shape == (20,)
    assert out["x_test"].shape == (4, 3, 32, 32)
    assert out["classes"] == list(data.CIFAR10_CLASSES)
    first = written["data_batch_1"][0].reshape(4, 3, 32, 32)
    np.testing.assert_array_equal(np.rint(out["x_train"][:4].numpy() * 255), first)
    np.testing.assert_array_equal(out["y_test"].numpy(), written["test_batch"][1])


def test_load_cifar10_normalised(tmp_path: Path) -> None:
    _write_cifar(tmp_path, n=6, seed=1)
    with open(tmp_path / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    out = data.load_cifar10(tmp_path)
    x = out["x_train"]
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)
    assert out["mean"].shape == (3,) and out["std"].shape == (3,)
    assert out["classes"][0] == "c0"


def test_load_cifar10_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        data.load_cifar10(tmp_path)
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        data.load_cifar10(tmp_path)


def test_load_cifar10_truncated(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    path = tmp_path / "data_batch_2"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="data_batch_2"):
        data.load_cifar10(tmp_path)


def test_load_cifar10_garbage_and_shapes(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    path = tmp_path / "test_batch"
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="test_batch"):
        data.load_cifar10(tmp_path)
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"test_batch.*\(N, 3072\)"):
        data.load_cifar10(tmp_path)
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, f)
    with pytest.raises(ValueError, match="test_batch.*labels"):
        data.load_cifar10(tmp_path)


def test_load_cifar10_refuses_arbitrary_globals(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Path("x"), b"labels": []}, f)
    with pytest.raises(ValueError, match="data_batch_1.*refusing"):
        data.load_cifar10(tmp_path)


# ---------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------


def _write_images(root: Path, classes: dict[str, int], size: tuple[int, int] = (20, 12)) -> None:
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            image_module.fromarray(pixels).save(root / name / f"img{i}.png")


def test_load_image_folder(tmp_path: Path) -> None:
    _write_images(tmp_path, {"b_cls": 2, "a_cls": 3, "c_cls": 1})
    (tmp_path / "a_cls" / "notes.txt").write_text("ignored")
    x, y, names = data.load_image_folder(tmp_path, image_size=8)
    assert names == ["a_cls", "b_cls", "c_cls"]
    assert x.shape == (6, 3, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y.tolist() == [0, 0, 0, 1, 1, 2]


def test_load_image_folder_uniform_colour_exact(tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    (tmp_path / "red").mkdir()
    image_module.new("RGB", (30, 17), (255, 0, 51)).save(tmp_path / "red" / "r.png")
    x, y, _ = data.load_image_folder(tmp_path, image_size=5)
    expected = torch.tensor([1.0, 0.0, 0.2]).view(1, 3, 1, 1).expand(1, 3, 5, 5)
    torch.testing.assert_close(x, expected)
    assert y.tolist() == [0]


def test_load_image_folder_classes_split_and_cap(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"x": 3, "y": 2, "z": 2})
    _write_images(tmp_path / "val", {"x": 1, "y": 1, "z": 1})
    with pytest.raises(ValueError, match="split"):
        data.load_image_folder(tmp_path)
    x, y, names = data.load_image_folder(tmp_path, 4, classes=2, split="train", max_per_class=2)
    assert names == ["x", "y"] and x.shape == (4, 3, 4, 4) and y.tolist() == [0, 0, 1, 1]
    _, y_val, _ = data.load_image_folder(tmp_path, 4, split="val")
    assert y_val.tolist() == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="test"):
        data.load_image_folder(tmp_path, split="test")


def test_load_image_folder_corrupt(tmp_path: Path) -> None:
    _write_images(tmp_path, {"a": 1, "b": 1})
    bad = tmp_path / "b" / "broken.png"
    good = (tmp_path / "b" / "img0.png").read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="broken.png"):
        data.load_image_folder(tmp_path, image_size=4)
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.png"):
        data.load_image_folder(tmp_path, image_size=4)


def test_load_image_folder_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no class folders"):
        data.load_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        data.load_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError):
        data.load_image_folder(tmp_path / "missing")
