"""neuraloperator's Fourier neural operators (complex spectral weights) in forward mode."""

from __future__ import annotations

import warnings

import pytest
import torch

from curveball import CurveBall, ggn_vector_product
from curveball.losses import mse_loss

neuralop = pytest.importorskip("neuralop", reason="the optional package neuraloperator")


def fno(dims: int, double: bool = False):
    torch.manual_seed(0)
    modes = (4,) if dims == 1 else (4, 4)
    model = neuralop.models.FNO(n_modes=modes, hidden_channels=4, in_channels=1, out_channels=1)
    shape = (3, 1, 16) if dims == 1 else (2, 1, 8, 8)
    if double:
        model = model._apply(
            lambda t: t.to(torch.complex128) if t.is_complex() else t.to(torch.float64)
        )
    dtype = torch.float64 if double else torch.float32
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    return model, x, torch.randn(*shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("dims", [1, 2])
def test_the_fno_keeps_complex_weights_and_trains_in_forward_mode(dims):
    model, x, t = fno(dims)
    assert any(p.is_complex() for p in model.parameters())
    opt = CurveBall(model, forward_mode="forward")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback, no skip
        losses = [opt.step(lambda: model(x), mse_loss(t))[0].item() for _ in range(10)]
    assert opt.last.engine == "forward" and losses[-1] < losses[0]


@pytest.mark.parametrize("dims", [1, 2])
def test_forward_mode_and_double_backward_give_the_same_gauss_newton_product(dims):
    model, x, t = fno(dims, double=True)
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.float64, torch.complex128}
    g = torch.Generator().manual_seed(2)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    products = [
        ggn_vector_product(lambda: model(x), mse_loss(t), params, v, module=model, forward_mode=m)
        for m in ("forward", "double-backward")
    ]
    flat = [torch.cat([torch.view_as_real(t).reshape(-1) if t.is_complex() else t.reshape(-1)
                       for t in product]) for product in products]  # fmt: skip
    # the FNO evaluates to about 1e-10 relative even in float64 (its central finite
    # differences stop converging there); the two paths agree to 1e-10 (1-D) and 2e-9 (2-D),
    # depending on the thread count
    assert (flat[0] - flat[1]).norm() <= 1e-8 * flat[1].norm()
