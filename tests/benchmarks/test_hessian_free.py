"""Hessian-free against dense oracles: CG on small SPD systems, Gauss-Newton products equal to
JᵀJv, the damping rule, the Armijo backtracking, and the step on linear least squares."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from benchmarks.hessian_free import (
    GaussNewtonProducts,
    HessianFree,
    adapted_damping,
    conjugate_gradient,
    reduction_ratio,
)
from benchmarks.line_search import backtracking_line_search
from benchmarks.pdes import TASKS, residual_vector


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems: one thread (two oversubscribe a shared machine, for no gain)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_problem(name: str = "poisson2d", width: int = 3, points: int = 5):
    pde = TASKS[name].pde
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(pde.dim, width), nn.Tanh(), nn.Linear(width, 1)).double()
    return pde, model, pde.sample({t: points for t in pde.terms}, torch.Generator().manual_seed(1))


def dense_jacobian(pde, model, points) -> torch.Tensor:
    """∂r/∂θ of the user's-way residual by torch.autograd.functional.jacobian (N × D)."""
    names = [n for n, _ in model.named_parameters()]

    class Bound(nn.Module):
        def __init__(self, params):
            super().__init__()
            self.params = params

        def forward(self, x):
            return functional_call(model, dict(zip(names, self.params, strict=True)), (x,))

    blocks = torch.autograd.functional.jacobian(
        lambda *params: residual_vector(pde, Bound(params), points), tuple(model.parameters())
    )
    return torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=1)


def spd(n: int, seed: int, condition: float = 1e3) -> torch.Tensor:
    """A random symmetric positive definite matrix with eigenvalues in [1, condition]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(0, math.log10(condition), n, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T


@pytest.mark.parametrize("seed", [0, 1])
def test_cg_solves_a_small_spd_system_to_tolerance(seed):
    a = spd(20, seed)
    b = torch.randn(20, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    result = conjugate_gradient(lambda v: a @ v, b, max_iter=200, tol=1e-12, progress_eps=0)
    assert (a @ result.x - b).norm() <= 1e-11 * b.norm()
    torch.testing.assert_close(result.x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-12)
    assert result.relative_residual <= 1e-12
    assert result.value == pytest.approx(float(0.5 * result.x @ a @ result.x - b @ result.x))


def test_cg_from_the_solution_stops_at_once_and_the_cap_is_kept():
    a = spd(15, 2)
    b = torch.ones(15, dtype=torch.float64)
    exact = torch.linalg.solve(a, b)
    assert conjugate_gradient(lambda v: a @ v, b, exact, tol=1e-8).iterations == 0
    capped = conjugate_gradient(lambda v: a @ v, b, max_iter=3, tol=0.0, progress_eps=0)
    assert capped.iterations == 3 and capped.relative_residual > 1e-8


def test_cg_iterates_lower_the_quadratic_until_martens_test_stops_them():
    a = spd(60, 3, condition=1e6)
    b = torch.ones(60, dtype=torch.float64)
    full = conjugate_gradient(lambda v: a @ v, b, max_iter=500, tol=1e-14, progress_eps=0)
    early = conjugate_gradient(lambda v: a @ v, b, max_iter=500, tol=1e-14, progress_eps=1e-2)
    assert early.iterations < full.iterations
    assert full.value <= early.value < 0


@pytest.mark.parametrize("name", ["poisson2d", "heat1d"])
def test_gauss_newton_products_match_a_dense_jacobian(name):
    pde, model, points = tiny_problem(name)
    jacobian = dense_jacobian(pde, model, points)
    residual = residual_vector(pde, model, points)
    products = GaussNewtonProducts(residual, list(model.parameters()))
    v = torch.randn(jacobian.shape[1], generator=torch.Generator().manual_seed(4)).double()
    u = torch.randn(jacobian.shape[0], generator=torch.Generator().manual_seed(5)).double()
    torch.testing.assert_close(products.jvp(v), jacobian @ v, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(products.vjp(u), jacobian.T @ u, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(products(v), jacobian.T @ (jacobian @ v), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(products.gradient(), jacobian.T @ residual.detach())


@pytest.mark.parametrize(("ratio", "expected"), [(0.9, 2 / 3), (0.5, 1.0), (0.1, 1.5),
                                                  (-3.0, 1.5), (math.nan, 1.5)])  # fmt: skip
def test_the_damping_follows_the_levenberg_marquardt_rule(ratio, expected):
    assert adapted_damping(1.0, ratio) == pytest.approx(expected)


def test_the_reduction_ratio_is_measured_over_predicted_and_nan_without_a_predicted_decrease():
    assert reduction_ratio(-0.5, -1.0) == 0.5
    assert reduction_ratio(0.2, -1.0) == -0.2
    assert math.isnan(reduction_ratio(-0.1, 0.0))


def test_backtracking_takes_the_first_armijo_step():
    # φ(η) = (η − 0.2)²: φ(0) = 0.04, φ'(0) = −0.4.
    phi = lambda eta: torch.tensor((eta - 0.2) ** 2, dtype=torch.float64)  # noqa: E731
    eta, loss = backtracking_line_search(phi, current=0.04, slope=-0.4, armijo=0.5)
    assert float(loss) <= 0.04 + 0.5 * eta * -0.4
    assert float(phi(eta / 0.8)) > 0.04 + 0.5 * (eta / 0.8) * -0.4  # the previous trial failed
    eta, loss = backtracking_line_search(phi, current=0.04, slope=+0.4, max_tries=5)
    assert eta == 0.0 and float(loss) == 0.04  # an uphill direction: no move


def test_one_step_on_linear_least_squares_lands_on_the_solution_and_trusts_the_model():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(12, 3, generator=g).double(), torch.randn(12, generator=g).double()
    model = nn.Linear(3, 1).double()
    opt = HessianFree(model.parameters(), damping=1e-10, max_cg=10)
    opt.step(lambda: model(x).squeeze(-1) - y)
    design = torch.cat([x, torch.ones(12, 1).double()], 1)
    expected = torch.linalg.lstsq(design, y.unsqueeze(-1)).solution[:, 0]
    found = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    torch.testing.assert_close(found, expected, rtol=1e-7, atol=1e-8)
    assert opt.last["step_size"] == 1.0 and opt.last["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert opt.last["lambda"] == pytest.approx(1e-10 * 2 / 3)  # ρ > 3/4: λ shrinks


def test_hessian_free_lowers_a_pinn_loss_and_warm_starts_cg():
    pde, model, points = tiny_problem(width=6, points=20)
    opt = HessianFree(model.parameters(), max_cg=20)
    losses = [float(opt.step(lambda: residual_vector(pde, model, points))) for _ in range(4)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]
    assert all("direction" in opt.state[p] for p in model.parameters())


def test_hessian_free_refuses_bad_settings_by_name():
    params = [nn.Parameter(torch.zeros(2))]
    for kwargs, name in [({"damping": 0.0}, "damping"), ({"max_cg": 0}, "max_cg"),
                         ({"warm_start": 2.0}, "warm_start")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            HessianFree(params, **kwargs)
