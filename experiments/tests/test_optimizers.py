"""The baseline optimizers: Levenberg-Marquardt reaches known minimisers, the batched
grid rules reproduce torch.optim exactly, L-BFGS takes one iteration per step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curveball_experiments import optimizers


class Affine(nn.Module):
    """Residuals ``M w - b`` of a linear least-squares problem."""

    def __init__(self, m: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.m, self.b = m, b
        self.w = nn.Parameter(torch.zeros(m.shape[1], dtype=m.dtype))

    def forward(self) -> torch.Tensor:
        return self.m @ self.w - self.b


class Exponential(nn.Module):
    """Residuals ``a exp(b t) - y`` of an exponential fit."""

    def __init__(self, t: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        self.t, self.y = t, y
        self.a = nn.Parameter(torch.tensor(1.0, dtype=t.dtype))
        self.b = nn.Parameter(torch.tensor(0.0, dtype=t.dtype))

    def forward(self) -> torch.Tensor:
        return self.a * torch.exp(self.b * self.t) - self.y


def sum_of_squares(r: torch.Tensor) -> torch.Tensor:
    return r.pow(2).sum()


def test_levenberg_marquardt_solves_linear_least_squares() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(30, 6, generator=g, dtype=torch.float64)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    module = Affine(m, b)
    lm = optimizers.LevenbergMarquardt(module)
    for _ in range(20):
        lm.step(module, sum_of_squares)
    expected = torch.linalg.lstsq(m, b.unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(module.w.detach(), expected, rtol=1e-9, atol=1e-9)


def test_levenberg_marquardt_fits_exponential_exactly() -> None:
    t = torch.linspace(0.0, 1.0, 20, dtype=torch.float64)
    module = Exponential(t, 2.0 * torch.exp(-1.5 * t))
    lm = optimizers.LevenbergMarquardt(module)
    for _ in range(50):
        lm.step(module, sum_of_squares)
    assert module.a.item() == pytest.approx(2.0, abs=1e-8)
    assert module.b.item() == pytest.approx(-1.5, abs=1e-8)
    assert lm.accepted > 0


def test_levenberg_marquardt_returns_loss_before_the_update() -> None:
    module = Affine(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    lm = optimizers.LevenbergMarquardt(module, mu=1.0)
    loss = lm.step(module, sum_of_squares)
    assert loss.item() == pytest.approx(2.0)
    assert float(sum_of_squares(module())) < 2.0


def test_levenberg_marquardt_rejects_bad_arguments() -> None:
    module = Affine(torch.eye(2), torch.ones(2))
    with pytest.raises(ValueError):
        optimizers.LevenbergMarquardt(module, mu=0.0)
    with pytest.raises(ValueError):
        optimizers.LevenbergMarquardt(module, tau=-1.0)


def _quadratic_grads(w: torch.Tensor) -> torch.Tensor:
    scale = torch.tensor([1.0, 2.0, 0.1], dtype=w.dtype)
    return torch.autograd.grad((scale * (w - 1.0).pow(4) + w.pow(2)).sum(), w)[0]


@pytest.mark.parametrize("rule", ["SGD", "Adam"])
def test_grid_rules_match_torch_optim(rule: str) -> None:
    lrs = [1e-3, 0.02]
    start = torch.tensor([0.3, -0.2, 2.0], dtype=torch.float64)
    batch = start.expand(len(lrs), 3).clone().requires_grad_(True)
    grid = optimizers.GRID_RULES[rule]([batch], torch.tensor(lrs, dtype=torch.float64)[:, None])
    singles = [start.clone().requires_grad_(True) for _ in lrs]
    make = {"SGD": optimizers.sgd, "Adam": optimizers.adam}[rule]
    torch_optimizers = [make([w], lr).optimizer for w, lr in zip(singles, lrs, strict=True)]
    for _ in range(25):
        grid.update([_quadratic_grads(batch)])
        for w, opt in zip(singles, torch_optimizers, strict=True):
            opt.zero_grad()
            w.grad = _quadratic_grads(w)
            opt.step()
    torch.testing.assert_close(
        batch.detach(), torch.stack(singles).detach(), rtol=1e-12, atol=1e-14
    )


def test_lr_grid_has_half_steps() -> None:
    grid = optimizers.lr_grid(-2, 0)
    assert len(grid) == 5
    assert grid[0] == pytest.approx(1e-2) and grid[-1] == pytest.approx(1.0)
    assert grid[1] == pytest.approx(10**-1.5)
    assert len(optimizers.lr_grid(-5, 0, half_steps=False)) == 6


def test_lbfgs_step_is_one_iteration() -> None:
    t = torch.linspace(0, 1, 10, dtype=torch.float64)
    module = Exponential(t, 2.0 * torch.exp(-t))
    stepper = optimizers.LBFGSStepper(module.parameters())
    with torch.no_grad():
        before = float(sum_of_squares(module()))
    stepper.step(module, sum_of_squares)
    state = stepper.optimizer.state[stepper.optimizer._params[0]]
    assert state["n_iter"] == 1
    with torch.no_grad():
        assert float(sum_of_squares(module())) < before
