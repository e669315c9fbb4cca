"""Readers of the official dataset file formats (no download, no folder rules).

The loaders read the official on-disk formats from a directory given by the
user and never download anything:

* MNIST -- the IDX files of the original distribution, raw or gzip-compressed
  (:func:`read_idx`, :func:`load_mnist`, :func:`mnist_splits`);
* CIFAR-10 -- the "python version" pickle batches (:func:`load_cifar10`);
* ImageNet-style image folders, one sub-folder per class
  (:func:`load_image_folder`).

All loaders validate what they read; a corrupt or truncated file raises a
``ValueError`` whose message names the file and the problem, a missing file a
``FileNotFoundError`` naming the expected file(s).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CIFAR10_CLASSES",
    "IMAGE_EXTENSIONS",
    "load_cifar10",
    "load_image_folder",
    "load_mnist",
    "mnist_splits",
    "read_idx",
]

PathLike = str | os.PathLike[str]

# ---------------------------------------------------------------------------
# IDX / MNIST
# ---------------------------------------------------------------------------

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_MNIST_COUNTS = {"train": 60000, "test": 10000}


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently decompressing it if it is gzip-compressed."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b" or path.suffix == ".gz":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    return data


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a numpy array.

    The IDX header is two zero bytes, a type code (``0x08`` unsigned byte, ...),
    the number of dimensions and then one big-endian 32-bit size per dimension;
    the data follow in row-major order.  The file length must match the header
    exactly.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: for a bad magic number, an unknown type code, or a file whose
            length does not match its header (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: file too short for an IDX header ({len(data)} bytes)")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{struct.unpack('>I', data[:4])[0]:08x} "
            "(the first two bytes must be zero)"
        )
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{type_code:02x}")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares zero dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f"{path}: truncated IDX header (expected {header_len} bytes, got {len(data)})"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _IDX_DTYPES[type_code]
    expected = header_len + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing data"
        raise ValueError(
            f"{path}: file {what}: header declares shape {tuple(shape)} "
            f"({expected} bytes in all) but the file has {len(data)} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _find_mnist_file(data_dir: Path, prefix: str, kind: str, ndim: int) -> Path | None:
    """Locate ``{prefix}-{kind}-idx{ndim}-ubyte[.gz]`` (or the ``.idx`` spelling)."""
    names = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
    for folder in (data_dir, data_dir / "raw", data_dir / "MNIST" / "raw"):
        for name in names:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
    return None


def mnist_files(data_dir: Path, split: str) -> tuple[Path | None, Path | None]:
    """The image and label files of one split in ``data_dir`` (``None`` where missing)."""
    prefix = _MNIST_PREFIX[split]
    return (
        _find_mnist_file(data_dir, prefix, "images", 3),
        _find_mnist_file(data_dir, prefix, "labels", 1),
    )


def load_mnist(data_dir: PathLike, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of MNIST from the official IDX files.

    Looks in ``data_dir`` (and its ``raw`` and ``MNIST/raw`` sub-folders) for
    ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (``split="train"``)
    or ``t10k-images-idx3-ubyte`` / ``t10k-labels-idx1-ubyte`` (``split="test"``),
    each optionally with a ``.gz`` suffix.

    Returns:
        Images as float32 in ``[0, 1]`` of shape ``(N, 1, 28, 28)`` and int64
        labels of shape ``(N,)``.

    Raises:
        FileNotFoundError: naming the expected files if they are missing.
        ValueError: if a file is corrupt, truncated, has the wrong magic number
            or dimensions, or the image and label counts disagree.
    """
    if split not in _MNIST_PREFIX:
        raise ValueError(f"unknown MNIST split {split!r}; expected 'train' or 'test'")
    data_dir = Path(data_dir)
    prefix = _MNIST_PREFIX[split]
    image_path, label_path = mnist_files(data_dir, split)
    missing = [
        f"{prefix}-{kind}-idx{nd}-ubyte[.gz]"
        for kind, nd, found in (("images", 3, image_path), ("labels", 1, label_path))
        if found is None
    ]
    if missing:
        raise FileNotFoundError(
            f"MNIST {split} split: {', '.join(missing)} not found in {data_dir}"
        )
    assert image_path is not None and label_path is not None

    images = read_idx(image_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"{image_path}: expected an unsigned-byte IDX file with 3 dimensions "
            f"(magic 0x00000803), got dtype {images.dtype} with {images.ndim} dimensions"
        )
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{image_path}: expected 28x28 images, got {images.shape[1:]}")
    labels = read_idx(label_path)
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{label_path}: expected an unsigned-byte IDX file with 1 dimension "
            f"(magic 0x00000801), got dtype {labels.dtype} with {labels.ndim} dimensions"
        )
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{label_path}: {labels.shape[0]} labels but {image_path.name} "
            f"holds {images.shape[0]} images"
        )
    if labels.size and int(labels.max()) > 9:
        raise ValueError(f"{label_path}: label {int(labels.max())} out of range 0-9")

    x = torch.from_numpy(images).to(torch.float32).div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def mnist_splits(
    data_dir: PathLike, train_size: int = 8000, val_size: int = 2000
) -> dict[str, Any]:
    """Training and validation sets of MNIST for the experiments.

    If the official training files are present, the official training set is
    used for training and the official test set for validation.  If only the
    official test files are present, the test set is split deterministically:
    its first ``train_size`` images (8,000 by default) are used for training and
    its last ``val_size`` images (2,000 by default) for validation.

    Returns:
        A dict with keys ``x_train``, ``y_train``, ``x_val``, ``y_val`` (tensors
        as returned by :func:`load_mnist`) and ``note``, a human-readable
        sentence describing which data were used.
    """
    data_dir = Path(data_dir)
    train_images, train_labels = mnist_files(data_dir, "train")
    x_test, y_test = load_mnist(data_dir, "test")
    if train_images is not None or train_labels is not None:
        x_train, y_train = load_mnist(data_dir, "train")
        note = (
            f"MNIST: official training set ({len(x_train):,} images) for training, "
            f"official test set ({len(x_test):,} images) for validation."
        )
        return {
            "x_train": x_train,
            "y_train": y_train,
            "x_val": x_test,
            "y_val": y_test,
            "note": note,
        }

    n = len(x_test)
    if train_size < 0 or val_size < 0 or train_size + val_size > n:
        raise ValueError(
            f"cannot take {train_size} training and {val_size} validation images from "
            f"the {n} images of the MNIST test set in {data_dir}"
        )
    note = (
        f"MNIST: official training files not found in {data_dir}; using the official "
        f"test set ({n:,} images) split deterministically: first {train_size:,} images "
        f"for training, last {val_size:,} images for validation."
    )
    return {
        "x_train": x_test[:train_size].clone(),
        "y_train": y_test[:train_size].clone(),
        "x_val": x_test[n - val_size :].clone(),
        "y_val": y_test[n - val_size :].clone(),
        "note": note,
    }


# ---------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------

#: CIFAR-10 class names, used when ``batches.meta`` is absent.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# Globals an official CIFAR pickle (or a re-saved one) may legitimately refer to.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the numpy globals needed for array data."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _load_pickle(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # pickle raises many different exception types
        raise ValueError(
            f"{path}: not a valid CIFAR-10 pickle ({type(exc).__name__}: {exc})"
        ) from exc


def _get(d: dict[Any, Any], key: str) -> Any:
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 batch: uint8 images (N, 3, 32, 32) and int64 labels."""
    batch = _load_pickle(path)
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if data is None or labels is None:
        raise ValueError(f"{path}: missing b'data' or b'labels' entry")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(
            f"{path}: b'data' must be a uint8 array of shape (N, 3072), "
            f"got {data.dtype} array of shape {data.shape}"
        )
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: b'labels' is not a list of integers ({exc})") from exc
    if labels.shape != (data.shape[0],):
        raise ValueError(
            f"{path}: {labels.size} labels for {data.shape[0]} images (shape {labels.shape})"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels out of range 0-9")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_folder(data_dir: Path) -> Path:
    for folder in (data_dir / "cifar-10-batches-py", data_dir):
        if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
            return folder
    raise FileNotFoundError(
        f"CIFAR-10 python batches (data_batch_1..5, test_batch) not found in {data_dir} "
        f"or {data_dir / 'cifar-10-batches-py'}"
    )


def load_cifar10(data_dir: PathLike, normalize: bool = True) -> dict[str, Any]:
    """Load CIFAR-10 from the official "python version" pickle batches.

    ``data_dir`` is either the ``cifar-10-batches-py`` folder itself or its
    parent.  The files ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``
    must all be present.  Pickles are read with a restricted unpickler that only
    accepts the numpy globals needed for array data.

    Args:
        data_dir: folder holding the batches (or its parent).
        normalize: subtract the per-channel mean and divide by the per-channel
            standard deviation, both computed on the training set; otherwise the
            images are scaled to ``[0, 1]``.

    Returns:
        A dict with float32 ``x_train`` ``(50000, 3, 32, 32)``, int64 ``y_train``,
        ``x_test``, ``y_test``, the per-channel ``mean`` and ``std`` used (of the
        ``[0, 1]``-scaled pixels; zeros and ones if ``normalize=False``) and the
        list of ``classes``.

    Raises:
        FileNotFoundError: naming the missing batch file(s).
        ValueError: naming a corrupt or malformed batch file.
    """
    folder = _cifar_folder(Path(data_dir))
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in [*train_names, "test_batch"] if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10: {', '.join(missing)} not found in {folder}")

    parts = [_read_cifar_batch(folder / n) for n in train_names]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _read_cifar_batch(folder / "test_batch")

    classes = list(CIFAR10_CLASSES)
    if (folder / "batches.meta").is_file():
        meta = _load_pickle(folder / "batches.meta")
        names = _get(meta, "label_names") if isinstance(meta, dict) else None
        if names is not None and len(names) == 10:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    xt = torch.from_numpy(x_train).to(torch.float32).div_(255.0)
    xv = torch.from_numpy(x_test).to(torch.float32).div_(255.0)
    if normalize:
        mean = xt.mean(dim=(0, 2, 3))
        std = xt.std(dim=(0, 2, 3)).clamp_min(1e-6)
        xt = (xt - mean[:, None, None]) / std[:, None, None]
        xv = (xv - mean[:, None, None]) / std[:, None, None]
    else:
        mean, std = torch.zeros(3), torch.ones(3)
    return {
        "x_train": xt,
        "y_train": torch.from_numpy(y_train),
        "x_test": xv,
        "y_test": torch.from_numpy(y_test),
        "mean": mean,
        "std": std,
        "classes": classes,
    }


# ---------------------------------------------------------------------------
# Image folders (ImageNet layout)
# ---------------------------------------------------------------------------

#: File extensions (lower case) recognised as images by :func:`load_image_folder`.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp"}
)


def load_image_folder(
    root: PathLike,
    image_size: int = 64,
    classes: int | None = None,
    split: str | None = None,
    max_per_class: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Load an ImageNet-style folder (one sub-folder of images per class) into memory.

    Every image is decoded with Pillow, converted to RGB, centre-cropped to a
    square and resized (bilinear) to ``image_size x image_size``.  Class labels
    are the indices of the class folders in sorted order.

    Args:
        root: the dataset folder.  If ``split`` is given (e.g. ``"train"`` or
            ``"val"``), the class folders are read from ``root / split``.
        image_size: side of the square output images.
        classes: keep only the first ``classes`` class folders (sorted by name).
        split: optional split sub-folder.  When ``None`` and ``root`` holds only
            ``train``/``val``/``test`` folders, a ``ValueError`` asks for it.
        max_per_class: keep at most this many images per class (sorted by name).

    Returns:
        float32 images in ``[0, 1]`` of shape ``(N, 3, image_size, image_size)``,
        int64 labels of shape ``(N,)`` and the list of class names.

    Raises:
        ImportError: if Pillow is not installed.
        FileNotFoundError: if the folder (or split folder) does not exist.
        ValueError: naming an image file that cannot be decoded, or if no class
            folders or no images are found.
    """
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_image_folder needs Pillow to decode images; install it with 'pip install pillow'"
        ) from exc

    folder, class_dirs = _class_folders(Path(root), split, classes)
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if max_per_class is not None:
            files = files[:max_per_class]
        for file in files:
            images.append(_decode_image(Image, file, image_size))
            labels.append(label)
    if not images:
        raise ValueError(f"no image files found under {folder}")

    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    y = torch.tensor(labels, dtype=torch.int64)
    return x.contiguous(), y, [p.name for p in class_dirs]


def _class_folders(root: Path, split: str | None, classes: int | None) -> tuple[Path, list[Path]]:
    """The folder holding the class folders, and the (first ``classes``) class folders."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    folder = root
    if split is not None:
        folder = root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"split folder {split!r} not found: {folder}")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if split is None and class_dirs and {p.name for p in class_dirs} <= {"train", "val", "test"}:
        raise ValueError(
            f"{folder} contains split folders ({', '.join(p.name for p in class_dirs)}) "
            "rather than class folders; pass split='train' or split='val'"
        )
    if classes is not None:
        if classes < 1:
            raise ValueError(f"classes must be positive, got {classes}")
        class_dirs = class_dirs[:classes]
    if not class_dirs:
        raise ValueError(f"no class folders found in {folder}")

    return folder, class_dirs


def _decode_image(image_module: Any, path: Path, size: int) -> np.ndarray:
    """Decode, centre-crop and resize one image to a ``(size, size, 3)`` uint8 array."""
    try:
        with image_module.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            img = img.resize((size, size), image_module.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8).copy()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise ValueError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc


# ---------------------------------------------------------------------------
# Mini-batches
# ---------------------------------------------------------------------------
