"""Model zoo for the CurveBall experiments.

Every factory returns a :class:`torch.nn.Module` that maps a batch of inputs to
unnormalised class scores (logits) of shape ``(batch, num_classes)``:

* :func:`mlp` -- a fully connected network with ReLU activations;
* :func:`basic_cnn` -- the small LeNet-like CIFAR network of MatConvNet used as
  the "basic CNN" in the CurveBall paper (optionally with batch normalisation);
* :func:`resnet18` -- the usual CIFAR variant of ResNet-18;
* :func:`vggf` -- VGG-F (Chatfield et al., 2014) for ImageNet-style inputs;
* :func:`random_architecture` -- a randomly sampled small CNN or MLP, used for
  the robustness study over architectures.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "BasicBlock",
    "ResNet",
    "basic_cnn",
    "count_parameters",
    "mlp",
    "random_architecture",
    "resnet18",
    "vggf",
]

#: Activation functions that :func:`random_architecture` samples from.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
}


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Return the number of (trainable) scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------
# Multi-layer perceptron
# ---------------------------------------------------------------------------


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def mnist_mlp(num_classes: int = 10) -> nn.Module:
    """The MNIST MLP of the CurveBall paper's experiments: 784-128-64-32-10, tanh.

    (The authors' MatConvNet model ``mnist_mlp``; PyTorch's default initialisation.)
    """
    return mlp(784, (128, 64, 32), num_classes, activation="tanh")


def mlp(
    in_features: int = 784,
    hidden: Sequence[int] = (512, 512),
    num_classes: int = 10,
    activation: str = "relu",
) -> nn.Module:
    """Fully connected network: flatten, then ``Linear + activation`` per hidden layer.

    Args:
        in_features: number of input features after flattening (784 for MNIST).
        hidden: widths of the hidden layers; an empty sequence gives a linear
            (multinomial logistic regression) model.
        num_classes: number of output logits.
        activation: ``"relu"`` or ``"tanh"``.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(in_features)
    for h in hidden:
        layers += [nn.Linear(width, int(h)), _ACTIVATIONS[activation]()]
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------
# Basic CIFAR CNN (MatConvNet "cifar" example network)
# ---------------------------------------------------------------------------


def basic_cnn(batch_norm: bool = False, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """The basic CIFAR-10 CNN of the CurveBall paper (MatConvNet's LeNet-like net).

    Layout for a ``3x32x32`` input (spatial size after each stage in brackets)::

        conv 5x5, 32, pad 2            [32]
        max pool 3, stride 2           [16]
        ReLU
        conv 5x5, 32, pad 2 -> ReLU    [16]
        avg pool 3, stride 2           [8]
        conv 5x5, 64, pad 2 -> ReLU    [8]
        avg pool 3, stride 2           [4]
        conv 4x4, 64 -> ReLU           [1]
        conv 1x1, num_classes          [1]  -> flattened to (B, num_classes)

    The pooling layers use ``ceil_mode=True``, which reproduces MatConvNet's
    asymmetric ``[0 1 0 1]`` pooling padding (32 -> 16 -> 8 -> 4).

    Args:
        batch_norm: insert a ``BatchNorm2d`` right after every convolution except
            the last (classifier) one.
        num_classes: number of output logits.
        in_channels: number of input channels.
    """

    def conv(cin: int, cout: int, k: int, pad: int) -> list[nn.Module]:
        block: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=pad)]
        if batch_norm:
            block.append(nn.BatchNorm2d(cout))
        return block

    layers: list[nn.Module] = [
        *conv(in_channels, 32, 5, 2),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),
        nn.ReLU(),
        *conv(32, 32, 5, 2),
        nn.ReLU(),
        nn.AvgPool2d(3, stride=2, ceil_mode=True),
        *conv(32, 64, 5, 2),
        nn.ReLU(),
        nn.AvgPool2d(3, stride=2, ceil_mode=True),
        *conv(64, 64, 4, 0),
        nn.ReLU(),
        nn.Conv2d(64, num_classes, 1),
        nn.Flatten(),
    ]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------
# ResNet-18 (CIFAR variant)
# ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the residual block."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, no max pooling, four stages, global pooling."""

    def __init__(
        self,
        blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(blocks_per_stage) != len(widths):
            raise ValueError("blocks_per_stage and widths must have the same length")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        in_planes = widths[0]
        for i, (n_blocks, planes) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks: list[nn.Module] = []
            for j in range(n_blocks):
                blocks.append(BasicBlock(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch of images."""
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-18 for CIFAR-sized images (11,173,962 parameters for 10 classes).

    A 3x3 stem convolution with 64 channels (no max pooling), four stages of two
    :class:`BasicBlock` each with 64/128/256/512 channels (stride 2 at the start
    of stages 2-4), batch normalisation, global average pooling and a linear
    classifier.
    """
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels)


# ---------------------------------------------------------------------------
# VGG-F
# ---------------------------------------------------------------------------


def vggf(num_classes: int = 1000, in_channels: int = 3, batch_norm: bool = False) -> nn.Module:
    """VGG-F ("fast") network of Chatfield et al. (BMVC 2014).

    ``conv1`` 64 11x11 stride 4 -> ReLU -> norm -> max pool 3/2;
    ``conv2`` 256 5x5 pad 2 -> ReLU -> norm -> max pool 3/2;
    ``conv3``-``conv5`` 256 3x3 pad 1 with ReLU -> max pool 3/2;
    ``fc6`` 4096 -> ReLU -> dropout; ``fc7`` 4096 -> ReLU -> dropout; ``fc8``.

    The normalisation layers are cross-channel local response normalisation
    (``nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1)``, the original
    choice), or ``BatchNorm2d`` when ``batch_norm=True``.  The pools use
    ``ceil_mode=True`` and an ``AdaptiveAvgPool2d((6, 6))`` precedes ``fc6`` so
    that the network also runs on small inputs (e.g. 64x64); for 224x224 inputs
    the feature map is already 6x6 and that pooling is the identity.

    Args:
        num_classes: number of output logits.
        in_channels: number of input channels.
        batch_norm: use batch normalisation instead of LRN.
    """

    def norm(channels: int) -> nn.Module:
        if batch_norm:
            return nn.BatchNorm2d(channels)
        return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)

    features = nn.Sequential(
        nn.Conv2d(in_channels, 64, 11, stride=4),
        nn.ReLU(),
        norm(64),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),
        nn.Conv2d(64, 256, 5, padding=2),
        nn.ReLU(),
        norm(256),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),
    )
    classifier = nn.Sequential(
        nn.Flatten(),
        nn.Linear(256 * 6 * 6, 4096),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(4096, num_classes),
    )
    return nn.Sequential(features, nn.AdaptiveAvgPool2d((6, 6)), classifier)


# ---------------------------------------------------------------------------
# Random architectures
# ---------------------------------------------------------------------------

_WIDTHS = (8, 16, 32, 64)
_POOLINGS = ("max", "avg", "none")


def random_architecture(
    seed: int,
    in_shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
) -> tuple[nn.Module, dict[str, Any]]:
    """Sample a small random CNN or MLP, deterministically in ``seed``.

    The sampled choices are:

    * ``kind``: ``"cnn"`` (1-4 blocks of 3x3 convolution, optional batch norm,
      activation and optional 2x2 pooling, then a linear classifier) or
      ``"mlp"`` (1-3 hidden linear layers with optional batch norm and an
      activation each);
    * ``widths``: one width per layer from {8, 16, 32, 64};
    * ``activation``: one of ``relu``, ``tanh``, ``elu``, ``sigmoid``,
      ``leaky_relu`` (shared by all layers);
    * ``batch_norm``: whether every hidden layer is followed by batch norm;
    * ``pooling``: ``max``, ``avg`` or ``none`` (CNNs only; ``none`` for MLPs).
      Pooling is skipped in blocks whose input is already smaller than 2x2.

    Only a private ``random.Random(seed)`` is used for the choices, so the global
    random state is untouched; the weights are initialised with PyTorch's global
    generator as usual.

    Returns:
        The module and a JSON-serialisable dict describing it (the choices above
        plus ``seed``, ``depth``, ``in_shape``, ``num_classes`` and
        ``num_parameters``).
    """
    rng = random.Random(seed)
    channels, height, width = (int(s) for s in in_shape)
    kind = rng.choice(("cnn", "mlp"))
    depth = rng.randint(1, 4) if kind == "cnn" else rng.randint(1, 3)
    widths = [rng.choice(_WIDTHS) for _ in range(depth)]
    activation = rng.choice(tuple(ACTIVATIONS))
    batch_norm = rng.random() < 0.5
    pooling = rng.choice(_POOLINGS) if kind == "cnn" else "none"
    make_act = ACTIVATIONS[activation]

    layers: list[nn.Module] = []
    if kind == "cnn":
        cin, h, w = channels, height, width
        for cout in widths:
            layers.append(nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(make_act())
            if pooling != "none" and h >= 2 and w >= 2:
                layers.append(nn.MaxPool2d(2) if pooling == "max" else nn.AvgPool2d(2))
                h, w = h // 2, w // 2
            cin = cout
        layers += [nn.Flatten(), nn.Linear(cin * h * w, num_classes)]
    else:
        fin = channels * height * width
        layers.append(nn.Flatten())
        for fout in widths:
            layers.append(nn.Linear(fin, fout, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(fout))
            layers.append(make_act())
            fin = fout
        layers.append(nn.Linear(fin, num_classes))
    model = nn.Sequential(*layers)

    description: dict[str, Any] = {
        "seed": int(seed),
        "kind": kind,
        "depth": depth,
        "widths": widths,
        "activation": activation,
        "batch_norm": batch_norm,
        "pooling": pooling,
        "in_shape": [channels, height, width],
        "num_classes": int(num_classes),
        "num_parameters": count_parameters(model),
    }
    return model, description


# ---------------------------------------------------------------------------
# Dispatch by name
# ---------------------------------------------------------------------------
