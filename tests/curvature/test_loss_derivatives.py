"""The loss half of the curvature product: L, J_L and H_L v against dense torch.func results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import CLASSES, LOSSES
from torch.func import grad, hessian

from curveball._curvature import loss_derivatives
from curveball._curvature.loss_derivatives import LossDerivatives
from curveball.losses import ClosedFormLoss, mse_loss
from curveball.losses import cross_entropy as closed_cross_entropy


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


def one_minus_p_correct(targets: torch.Tensor):
    """A smooth loss that is not convex in the logits."""
    return lambda y: (1.0 - torch.softmax(y, dim=1).gather(1, targets[:, None])).mean()


def welsch(targets: torch.Tensor):
    """A robust regression loss: convex near zero residual, concave far from it."""
    onehot = F.one_hot(targets, CLASSES).double()
    return lambda y: (1.0 - torch.exp(-((y - onehot) ** 2))).sum(dim=1).mean()


@pytest.mark.parametrize("make_loss", [one_minus_p_correct, welsch, LOSSES["log_cosh"]])
def test_psd_products_use_the_clamped_per_sample_blocks_of_the_dense_hessian(make_loss):
    g = torch.Generator().manual_seed(3)
    y = 2.0 * torch.randn(5, CLASSES, generator=g, dtype=torch.float64)
    targets = torch.randint(0, CLASSES, (5,), generator=g)
    loss_fn = make_loss(targets)
    dense = hessian(loss_fn)(y)  # (B, C, B, C)
    blocks = torch.stack([dense[i, :, i, :] for i in range(5)]).numpy()
    values, vectors = np.linalg.eigh(blocks)
    clamped = np.einsum("bij,bj,bkj->bik", vectors, np.maximum(values, 0.0), vectors)
    v = torch.randn(y.shape, generator=g, dtype=torch.float64)
    expected = np.einsum("bij,bj->bi", clamped, v.numpy())
    got = LossDerivatives(loss_fn, y, psd=True).hvp(v)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    if make_loss is LOSSES["log_cosh"]:  # already convex: the clamp changes nothing
        exact = LossDerivatives(loss_fn, y).hvp(v)
        torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12)
    else:
        assert values.min() < 0.0  # the oracle really had something to clamp


def closed_mse(targets: torch.Tensor) -> ClosedFormLoss:
    return mse_loss(F.one_hot(targets, CLASSES).double())


CLOSED = {"cross_entropy": closed_cross_entropy, "mse": closed_mse}


def _columns_case(seed: int = 0, columns: int = 7):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(6, CLASSES, generator=g, dtype=torch.float64)
    targets = torch.randint(0, CLASSES, (6,), generator=g)
    matrix = torch.randn(y.numel(), columns, generator=g, dtype=torch.float64)
    return y, targets, matrix


@pytest.mark.parametrize(
    ("name", "closed"), [(n, False) for n in sorted(LOSSES)] + [(n, True) for n in sorted(CLOSED)]
)
def test_hessian_columns_equal_the_dense_hessian_times_the_matrix(name, closed):
    y, targets, matrix = _columns_case()
    loss_fn = (CLOSED if closed else LOSSES)[name](targets)
    d = LossDerivatives(loss_fn, y)
    assert closed == (d._closed is not None)
    dense = hessian(LOSSES[name](targets))(y).reshape(y.numel(), y.numel())
    torch.testing.assert_close(d.hvp_columns(matrix), dense @ matrix, rtol=1e-12, atol=1e-14)


def test_hessian_columns_of_the_clamped_blocks_and_in_chunks(monkeypatch):
    y, targets, matrix = _columns_case(seed=1, columns=9)
    d = LossDerivatives(one_minus_p_correct(targets), y, psd=True)
    one_by_one = torch.stack([d.hvp(c.view(y.shape)).reshape(-1) for c in matrix.T], dim=1)
    monkeypatch.setattr(loss_derivatives, "COLUMN_CHUNK", 2 * y.numel())  # 2 columns a batch
    torch.testing.assert_close(d.hvp_columns(matrix), one_by_one, rtol=1e-12, atol=1e-14)


def test_hessian_columns_go_one_by_one_with_a_warning_where_vmap_fails(monkeypatch):
    y, targets, matrix = _columns_case(seed=2)
    d = LossDerivatives(LOSSES["log_cosh"](targets), y)
    expected = d.hvp_columns(matrix)
    grad = torch.autograd.grad

    def unbatchable(*args, is_grads_batched=False, **kwargs):
        if is_grads_batched:
            raise RuntimeError("Batching rule not implemented for aten::something")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", unbatchable)
    with pytest.warns(RuntimeWarning, match="could not be batched.*aten::something"):
        torch.testing.assert_close(d.hvp_columns(matrix), expected, rtol=1e-12, atol=1e-14)


def test_hessian_columns_of_a_loss_that_ignores_the_predictions_are_zero():
    y, _, matrix = _columns_case()
    d = LossDerivatives(lambda out: torch.tensor(2.0), y)
    assert torch.equal(d.hvp_columns(matrix), torch.zeros_like(matrix))
    with pytest.raises(ValueError, match="expected 18 rows"):
        d.hvp_columns(matrix[:5])
