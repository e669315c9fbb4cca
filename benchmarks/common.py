"""What the benchmarks and the examples share: small workloads, MNIST, timing helpers.

Kept apart from the paper's experiments (``curveball_experiments``) on purpose:
benchmarks measure the library on fixed workloads and must not move when an
experiment changes.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn


def write_markdown(path: str | Path | None, text: str) -> None:
    """Write a benchmark's generated table to ``path`` (if given), for the documentation to
    include as it is."""
    _write(path, text.rstrip())


def write_json(path: str | Path | None, payload: object) -> None:
    """Write a benchmark's settings and results to ``path`` (if given) as indented JSON."""
    _write(path, json.dumps(payload, indent=1))


def _write(path: str | Path | None, text: str) -> None:
    """``text`` and a newline into ``path``, its folder created; nothing if ``path`` is None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")


def count_parameters(model: nn.Module) -> int:
    """The number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def sync(device: torch.device) -> None:
    """Wait for the device, so that a host clock measures its work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mlp(widths: tuple[int, ...] = (784, 512, 512, 10), activation: type = nn.ReLU) -> nn.Module:
    """Flatten, then ``Linear`` layers of the given widths with ``activation`` between them."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(cin, cout))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def basic_cnn(batch_norm: bool = False, in_channels: int = 3, classes: int = 10) -> nn.Module:
    """The paper's basic CIFAR CNN (four 5x5/4x4 convolutions, pooling), for 32x32 inputs."""

    def conv(cin: int, cout: int, k: int, pad: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, padding=pad)] + (
            [nn.BatchNorm2d(cout)] if batch_norm else []
        )

    pool = {"stride": 2, "ceil_mode": True}
    return nn.Sequential(
        *conv(in_channels, 32, 5, 2), nn.MaxPool2d(3, **pool), nn.ReLU(),
        *conv(32, 32, 5, 2), nn.ReLU(), nn.AvgPool2d(3, **pool),
        *conv(32, 64, 5, 2), nn.ReLU(), nn.AvgPool2d(3, **pool),
        *conv(64, 64, 4, 0), nn.ReLU(), nn.Conv2d(64, classes, 1), nn.Flatten(),
    )  # fmt: skip


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.skip = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet18(classes: int = 10) -> nn.Module:
    """ResNet-18 for 32x32 images: 3x3 stem, four stages of two residual blocks (11.2M)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        layers += [_Residual(cin, cout, 1 if stage == 0 else 2), _Residual(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


class CharLSTM(nn.Module):
    """A character-level LSTM language model: embedding 32, 128 hidden units, next-character
    logits for every position (flattened into rows); ``recurrent=nn.GRU`` makes it a GRU."""

    def __init__(self, vocab: int = 64, recurrent: type[nn.Module] = nn.LSTM) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, 32)
        self.lstm = recurrent(32, 128, batch_first=True)
        self.head = nn.Linear(128, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embedding(tokens))[0]).flatten(0, 1)


def _read_idx_gz(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file (gzip or raw): a big-endian header, then the values."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_mnist_test_files(data_dir: str | Path) -> tuple[Path, Path]:
    """The official MNIST test files in ``data_dir`` or its ``mnist/`` folder."""
    for folder in (Path(data_dir), Path(data_dir) / "mnist"):
        for suffix in (".gz", ""):
            images = folder / f"t10k-images-idx3-ubyte{suffix}"
            labels = folder / f"t10k-labels-idx1-ubyte{suffix}"
            if images.is_file() and labels.is_file():
                return images, labels
    raise FileNotFoundError(f"no t10k-images/labels-idx?-ubyte[.gz] in {data_dir} or its mnist/")


def mnist_8k_2k(data_dir: str | Path) -> dict[str, torch.Tensor]:
    """The official MNIST test set split deterministically: the first 8,000 images
    train, the last 2,000 validate (pixels scaled to [0, 1], shape N x 1 x 28 x 28)."""
    images, labels = (_read_idx_gz(p) for p in find_mnist_test_files(data_dir))
    x = torch.from_numpy(images.copy()).float().div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return {"x_train": x[:8000], "y_train": y[:8000], "x_val": x[8000:], "y_val": y[8000:]}
