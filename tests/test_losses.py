"""Closed-form losses: values, gradients and Hessian products against dense torch.func
derivatives of PyTorch's own functions, and whole CurveBall steps against the autograd path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import grad, hessian

from curveball import CurveBall
from curveball._curvature.loss_derivatives import LossDerivatives
from curveball.losses import cross_entropy, mse_loss


def _against_dense(loss_fn, reference, y: torch.Tensor, seed: int = 0) -> None:
    """``loss_fn``'s closed forms equal the dense derivatives of ``reference`` (a plain
    PyTorch function of ``y``)."""
    v = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    d = LossDerivatives(loss_fn, y)
    dense_h = hessian(reference)(y).reshape(y.numel(), y.numel())
    torch.testing.assert_close(d.loss, reference(y), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d.grad, grad(reference)(y), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        d.hvp(v).reshape(-1), dense_h @ v.reshape(-1), rtol=1e-12, atol=1e-14
    )


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    classes=st.integers(2, 6),
    smoothing=st.sampled_from([0.0, 0.1, 0.5]),
    reduction=st.sampled_from(["mean", "sum"]),
    ignored=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cross_entropy_with_index_targets_matches_pytorch(
    rows, classes, smoothing, reduction, ignored, seed
):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, classes, generator=g, dtype=torch.float64)
    t = torch.randint(0, classes, (rows,), generator=g)
    if ignored and rows > 1:
        t[0] = -100
    kw = {"label_smoothing": smoothing, "reduction": reduction}
    _against_dense(cross_entropy(t, **kw), lambda out: F.cross_entropy(out, t, **kw), y, seed)


def test_cross_entropy_on_sequences_with_a_custom_ignore_index():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)  # batch, classes, positions
    t = torch.randint(0, 5, (3, 4), generator=g)
    t[1, 2] = 9
    kw = {"ignore_index": 9, "label_smoothing": 0.2}
    _against_dense(cross_entropy(t, **kw), lambda out: F.cross_entropy(out, t, **kw), y)


def test_cross_entropy_with_probability_targets_and_unbatched_logits():
    g = torch.Generator().manual_seed(2)
    y = torch.randn(4, 6, generator=g, dtype=torch.float64)
    q = torch.softmax(torch.randn(4, 6, generator=g, dtype=torch.float64), 1)
    loss = cross_entropy(q, label_smoothing=0.3)
    _against_dense(loss, lambda out: F.cross_entropy(out, q, label_smoothing=0.3), y)
    one = torch.tensor(2)
    _against_dense(cross_entropy(one), lambda out: F.cross_entropy(out, one), y[0])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_matches_pytorch(reduction):
    g = torch.Generator().manual_seed(3)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.randn(5, 3, generator=g, dtype=torch.float64)
    _against_dense(
        mse_loss(t, reduction=reduction), lambda out: F.mse_loss(out, t, reduction=reduction), y
    )


def test_the_objects_are_the_pytorch_losses_when_called():
    y, t = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    assert torch.equal(cross_entropy(t)(y), F.cross_entropy(y, t))
    assert torch.equal(mse_loss(y + 1)(y), F.mse_loss(y, y + 1))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: cross_entropy([0, 1]), TypeError, "target"),
        (lambda: cross_entropy(torch.tensor([True])), TypeError, "target"),
        (lambda: cross_entropy(torch.tensor([0]), label_smoothing=2.0), ValueError, "smoothing"),
        (lambda: cross_entropy(torch.tensor([0]), reduction="none"), ValueError, "reduction"),
        (lambda: mse_loss(torch.tensor([1])), TypeError, "floating"),
    ],
)
def test_bad_arguments_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "loss, y",
    [
        (cross_entropy(torch.tensor([0, 1])), torch.randn(3, 4)),
        (cross_entropy(torch.rand(2, 5)), torch.randn(2, 4)),
        (mse_loss(torch.randn(2, 3)), torch.randn(3, 2)),
    ],
)
def test_a_target_of_the_wrong_shape_is_named(loss, y):
    with pytest.raises(ValueError, match="shape"):
        loss.derivatives(y)


def test_half_precision_predictions_use_float32_derivatives():
    y, t = torch.randn(4, 3).half(), torch.tensor([0, 2, 1, 2])
    d = LossDerivatives(cross_entropy(t), y, upcast=True)
    assert d.grad.dtype == torch.float32 and d.hvp(torch.randn(4, 3).half()).dtype == torch.float32


@pytest.mark.parametrize("which", ["cross_entropy", "mse"])
def test_curveball_steps_equal_those_of_the_autograd_path(which):
    """A second code path: the same loss as a plain lambda goes through autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    if which == "cross_entropy":
        t = torch.randint(0, 3, (16,))
        closed, plain = cross_entropy(t), (lambda y: F.cross_entropy(y, t))
    else:
        t = torch.randn(16, 3, dtype=torch.float64)
        closed, plain = mse_loss(t), (lambda y: F.mse_loss(y, t))
    other = copy.deepcopy(model)
    a, b = CurveBall(model, lambd=0.5), CurveBall(other, lambd=0.5)
    for _ in range(6):
        loss_a, _ = a.step(lambda: model(x), closed)
        loss_b, _ = b.step(lambda: other(x), plain)
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=0)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-14)
    assert a.lambd == pytest.approx(b.lambd, rel=1e-12)
