"""ENGD against dense oracles: its Jacobian and Gramian, its direction (normal equations,
Woodbury), its step on a linear least-squares problem, and the grid line search."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from benchmarks.engd import ENGD, gramian, natural_gradient, woodbury_natural_gradient
from benchmarks.line_search import grid_line_search, loss_along, step_size_grid
from benchmarks.pdes import TASKS, FunctionalResidual, residual_vector


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
    counts = {t: points for t in pde.terms}
    return pde, model, pde.sample(counts, torch.Generator().manual_seed(1))


def dense_jacobian(pde, model, points) -> torch.Tensor:
    """∂r/∂θ of the user's-way residual, by torch.autograd.functional.jacobian (N × D)."""
    names = [n for n, _ in model.named_parameters()]

    def residual(*params):
        state = dict(zip(names, params, strict=True))
        return residual_vector(pde, _Bound(model, state), points)

    blocks = torch.autograd.functional.jacobian(residual, tuple(model.parameters()))
    return torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=1)


class _Bound(nn.Module):
    """``model`` evaluated at the parameters ``state`` (for the dense oracle)."""

    def __init__(self, model: nn.Module, state: dict) -> None:
        super().__init__()
        self.model, self.state = model, state

    def forward(self, x):
        return functional_call(self.model, self.state, (x,))


@pytest.mark.parametrize("name", ["poisson2d", "heat1d", "poisson5d"])
def test_the_per_sample_jacobian_and_gramian_match_a_dense_oracle(name):
    pde, model, points = tiny_problem(name)
    functional = FunctionalResidual(pde, model, points)
    r, jacobian = functional.jacobian(functional.parameters())
    oracle = dense_jacobian(pde, model, points)
    torch.testing.assert_close(jacobian, oracle, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(gramian(jacobian), oracle.T @ oracle, rtol=1e-11, atol=1e-11)


def _random(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randn(n, generator=g, dtype=torch.float64))  # fmt: skip


@pytest.mark.parametrize("damping", [0.0, 1e-3, 1.0])
def test_the_direction_solves_the_damped_normal_equations(damping):
    jacobian, r = _random(30, 8, 0)  # full column rank: N > D
    d = natural_gradient(jacobian, r, damping)
    lhs = (jacobian.T @ jacobian + damping * torch.eye(8, dtype=torch.float64)) @ d
    torch.testing.assert_close(lhs, -jacobian.T @ r, rtol=1e-10, atol=1e-10)


def test_without_damping_a_rank_deficient_gramian_gives_the_minimum_norm_direction():
    jacobian, r = _random(6, 10, 1)  # D > N: JᵀJ is singular
    expected = -torch.linalg.pinv(jacobian) @ r
    torch.testing.assert_close(natural_gradient(jacobian, r), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(("n", "d"), [(6, 10), (30, 8)])
def test_the_woodbury_form_equals_the_gramian_form(n, d):
    jacobian, r = _random(n, d, 2)
    for damping in (1e-4, 1e-1):
        torch.testing.assert_close(
            woodbury_natural_gradient(jacobian, r, damping),
            natural_gradient(jacobian, r, damping),
            rtol=1e-8,
            atol=1e-10,
        )


def _linear_problem(n: int, d: int):
    """r(θ) = Xw + c − y: linear, so ENGD's step of size 1 is the Gauss-Newton step."""
    x, y = _random(n, d, 3)
    model = nn.Linear(d, 1).double()
    design = torch.cat([x, torch.ones(n, 1).double()], 1)  # J, columns (w, c)

    def residual():
        return model(x).squeeze(-1) - y

    return model, design, y, residual, lambda: (residual().detach(), design)


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_one_step_lands_on_an_overdetermined_least_squares_solution():
    model, design, y, residual, jacobian = _linear_problem(12, 3)
    opt = ENGD(model.parameters(), damping=0.0)
    opt.step(residual, jacobian)
    expected = torch.linalg.lstsq(design, y.unsqueeze(-1)).solution[:, 0]
    torch.testing.assert_close(_flat_params(model), expected, rtol=1e-9, atol=1e-9)
    assert opt.last["step_size"] == 1.0 and opt.last["loss_after"] < opt.last["loss"]


@pytest.mark.parametrize(("form", "damping"), [("gramian", 0.0), ("woodbury", 1e-12)])
def test_one_step_interpolates_an_underdetermined_problem_with_the_least_move(form, damping):
    model, design, y, residual, jacobian = _linear_problem(3, 6)  # N = 3 < D = 7
    start = _flat_params(model)
    expected_move = -torch.linalg.pinv(design) @ residual().detach()
    opt = ENGD(model.parameters(), damping=damping, form=form)
    opt.step(residual, jacobian)
    torch.testing.assert_close(_flat_params(model) - start, expected_move, rtol=1e-8, atol=1e-9)
    assert residual().abs().max() < 1e-9


def test_engd_lowers_a_pinn_loss():
    pde, model, points = tiny_problem(width=6, points=20)
    functional = FunctionalResidual(pde, model, points)
    opt = ENGD(model.parameters())
    losses = [
        float(opt.step(lambda: residual_vector(pde, model, points),
                       lambda: functional.jacobian(functional.parameters())))
        for _ in range(5)
    ]  # fmt: skip
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]


def test_engd_refuses_bad_settings_by_name():
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="damping"):
        ENGD(params, damping=-1.0)
    with pytest.raises(ValueError, match="form"):
        ENGD(params, form="dense")
    with pytest.raises(ValueError, match="grid"):
        ENGD(params, grid=(1.0, 0.0))


# ------------------------------------------------------------------------------ line search
def test_the_grid_is_two_to_the_minus_k():
    assert step_size_grid(3) == (1.0, 0.5, 0.25, 0.125)
    assert len(step_size_grid()) == 31 and step_size_grid()[-1] == 2.0**-30


def test_the_line_search_picks_the_grid_minimum():
    grid = step_size_grid(10)
    phi = lambda eta: torch.tensor((eta - 0.3) ** 2 + 0.1 * math.sin(40 * eta))  # noqa: E731
    eta, loss = grid_line_search(phi, grid)
    brute = min(grid, key=lambda e: float(phi(e)))
    assert eta == brute and float(loss) == float(phi(brute))


def test_the_line_search_skips_non_finite_losses_and_never_climbs():
    grid = (1.0, 0.5, 0.25)
    losses = {1.0: math.nan, 0.5: 3.0, 0.25: 2.0}
    eta, loss = grid_line_search(lambda e: torch.tensor(losses[e]), grid)
    assert (eta, float(loss)) == (0.25, 2.0)
    eta, loss = grid_line_search(lambda e: torch.tensor(losses[e]), grid, current=1.5)
    assert (eta, float(loss)) == (0.0, 1.5)


def test_loss_along_moves_the_parameters_and_accept_leaves_them_there():
    p = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    loss_at, accept = loss_along([p], [torch.tensor([1.0, -1.0]).double()], lambda: p.sum() ** 2)
    assert float(loss_at(0.5)) == 9.0  # p = (1.5, 1.5)
    accept(0.0)
    assert p.tolist() == [1.0, 2.0]
    accept(2.0)
    assert p.tolist() == [3.0, 0.0]
