"""The loss half of the curvature product: L, J_L and H_L v against dense torch.func results."""

from __future__ import annotations

import pytest
import torch
from cases import CLASSES, LOSSES
from torch.func import grad, hessian

from curveball._curvature.loss_derivatives import LossDerivatives


def test_gradient_and_hessian_products_match_dense(loss_name):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(6, CLASSES, generator=g, dtype=torch.float64)
    targets = torch.randint(0, CLASSES, (6,), generator=g)
    loss_fn = LOSSES[loss_name](targets)
    v = torch.randn(y.shape, generator=g, dtype=torch.float64)
    d = LossDerivatives(loss_fn, y)
    dense_h = hessian(loss_fn)(y).reshape(y.numel(), y.numel())
    torch.testing.assert_close(d.loss, loss_fn(y))
    torch.testing.assert_close(d.grad.detach(), grad(loss_fn)(y))
    torch.testing.assert_close(d.hvp(v).reshape(-1), dense_h @ v.reshape(-1), rtol=1e-12, atol=0)


def test_a_loss_that_ignores_the_predictions_has_zero_derivatives():
    y = torch.randn(4, 2)
    d = LossDerivatives(lambda out: torch.tensor(2.0), y)
    assert torch.equal(d.grad, torch.zeros_like(y)) and torch.equal(d.hvp(y), torch.zeros_like(y))


@pytest.mark.parametrize("bad", [lambda y: y.sum(1), lambda y: 3.0, lambda y: (y > 0).sum()])
def test_a_loss_must_be_a_floating_point_scalar_tensor(bad):
    with pytest.raises(TypeError, match="loss_fn"):
        LossDerivatives(bad, torch.randn(4, 2))
