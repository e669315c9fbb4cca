"""The curvature product G v = Jᵀ H_L J v against the dense matrix built independently."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracles import dense_problem
from torch import nn

from curveball import ggn_vector_product


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def cnn_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 3),
    )


def cnn_pool() -> nn.Module:
    """Max and adaptive pooling, and an in-place activation on a convolution's output."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(3, 4, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


INPUTS = {"mlp": (6, 5), "cnn_bn": (6, 2, 4, 4), "cnn_pool": (6, 2, 5, 5)}
MODELS = {"mlp": mlp, "cnn_bn": cnn_bn, "cnn_pool": cnn_pool}


def losses(targets: torch.Tensor, onehot: torch.Tensor):
    return {
        "cross_entropy": lambda y: F.cross_entropy(y, targets),
        "mse": lambda y: F.mse_loss(y, onehot),
        # a custom loss whose Hessian is neither constant nor softmax-shaped
        "log_cosh": lambda y: (
            torch.log(torch.cosh(y - onehot)).sum(dim=1).mean() + 0.1 * (y**4).mean()
        ),
    }


@pytest.mark.parametrize("engine", ["forward", "double-backward"])
@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse", "log_cosh"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_ggn_product_matches_dense_matrix(model_name, loss_name, engine):
    torch.manual_seed(0)
    model = MODELS[model_name]().double()
    x = torch.randn(*INPUTS[model_name], dtype=torch.float64)
    targets = torch.randint(0, 3, (x.shape[0],))
    loss_fn = losses(targets, F.one_hot(targets, 3).double())[loss_name]
    params = list(model.parameters())
    vector = [torch.randn_like(p) for p in params]
    buffers = [b.clone() for b in model.buffers()]

    product = ggn_vector_product(
        lambda: model(x), loss_fn, params, vector, module=model if engine == "forward" else None
    )

    dense = dense_problem(model, x, loss_fn)
    expected = dense["G"] @ torch.cat([v.reshape(-1) for v in vector])
    got = torch.cat([p.reshape(-1) for p in product])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    if engine == "forward":  # the product leaves running statistics alone
        for before, after in zip(buffers, model.buffers(), strict=True):
            assert torch.equal(before, after)
