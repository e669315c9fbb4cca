"""The case matrix of the tests: small models with their batches, and losses.

Every test that needs a model draws it from here. A :class:`Case` builds a
seeded model and a seeded batch; :data:`LOSSES` turn targets into scalar losses
(two convex in the predictions, one custom loss with a non-trivial Hessian).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 3


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, CLASSES))


def _bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, CLASSES))


def _cnn_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, CLASSES),
    )


def _cnn_pool() -> nn.Module:
    """Max and adaptive pooling, and an in-place activation on a convolution's output."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(3, 4, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, CLASSES),
    )


def _cnn() -> nn.Module:
    """Convolutions, max and average pooling, an in-place activation."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 3, 3, padding=1),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3, CLASSES),
    )


class NoForwardModeSquare(torch.autograd.Function):
    """x², with a backward formula but no forward-mode (jvp) formula: forces the fallback."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


@dataclass(frozen=True)
class Case:
    """A small model and the shape of one sample of its input."""

    name: str
    build: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]

    def make(self, seed: int = 0, batch: int = 6, dtype: torch.dtype = torch.float64):
        """``(model, x, targets)``, all seeded by ``seed``."""
        torch.manual_seed(seed)
        model = self.build().to(dtype)
        x = torch.randn(batch, *self.sample_shape, dtype=dtype)
        targets = torch.randint(0, CLASSES, (batch,))
        return model, x, targets


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("mlp", _mlp, (5,)),
        Case("bn_mlp", _bn_mlp, (5,)),
        Case("cnn", _cnn, (2, 4, 4)),
        Case("cnn_bn", _cnn_bn, (2, 4, 4)),
        Case("cnn_pool", _cnn_pool, (2, 5, 5)),
    )
}


def cross_entropy(targets: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda y: F.cross_entropy(y, targets)


def mse(targets: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda y: F.mse_loss(y, F.one_hot(targets, CLASSES).to(y.dtype))


def log_cosh(targets: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A custom loss whose Hessian is neither constant nor softmax-shaped."""

    def loss(y: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(targets, CLASSES).to(y.dtype)
        return torch.log(torch.cosh(y - onehot)).sum(dim=1).mean() + 0.1 * (y**4).mean()

    return loss


LOSSES: dict[str, Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "cross_entropy": cross_entropy,
    "mse": mse,
    "log_cosh": log_cosh,
}


def tiny_problem(seed: int = 0, kind: str = "mlp", batch: int = 10):
    """A case's float64 model, its inputs and a cross-entropy loss."""
    model, x, t = CASES[kind].make(seed, batch=batch)
    return model, x, cross_entropy(t)


def flat_state(opt: torch.optim.Optimizer, model: nn.Module, key: str = "z") -> torch.Tensor:
    """One per-parameter state tensor of ``opt``, flattened in the model's parameter order."""
    return torch.cat([opt.state[p][key].reshape(-1) for p in model.parameters()])


# The zoo of model families people use (transformers, recurrent, normalisation, ...),
# shared with the conformance benchmark.
from benchmarks.zoo import ZOO  # noqa: E402
from benchmarks.zoo import cross_entropy as zoo_cross_entropy  # noqa: E402

__all__ = ["CASES", "CLASSES", "LOSSES", "ZOO", "Case", "NoForwardModeSquare", "zoo_cross_entropy"]
