"""The PINN problems: both residual forms agree, exact solutions solve them, points lie where
they should, and the operators match closed-form derivatives."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import vmap

from benchmarks.pdes import TASKS, FunctionalResidual, half_squared_norm, residual_vector
from benchmarks.pdes import operators as ops
from benchmarks.pdes.heat import Heat1D
from benchmarks.pdes.poisson import COS_SUM, SIN_PRODUCT, Poisson


class Exact(nn.Module):
    """The exact solution as a module, so the user's-way residuals can run on it."""

    def __init__(self, pde) -> None:
        super().__init__()
        self.pde = pde

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pde.exact(x).unsqueeze(-1)


class Polynomial(nn.Module):
    """u(x) = Σᵢ xᵢ³ + x₀x₁ (every derivative known in closed form)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x**3).sum(-1) + x[:, 0] * x[:, 1]).unsqueeze(-1)


def tiny(task_name: str, width: int = 6) -> tuple[object, nn.Module, dict]:
    """A task's PDE with a small tanh net and a few points (fast, same code paths)."""
    task = TASKS[task_name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(task.pde.dim, width), nn.Tanh(), nn.Linear(width, 1)).double()
    points = task.pde.sample({t: 7 + i for i, t in enumerate(task.pde.terms)},
                             torch.Generator().manual_seed(1))  # fmt: skip
    return task.pde, model, points


@pytest.mark.parametrize("name", list(TASKS))
def test_the_users_and_the_functional_residual_agree(name):
    pde, model, points = tiny(name)
    users = residual_vector(pde, model, points)
    functional = FunctionalResidual(pde, model, points)
    params = functional.parameters()
    torch.testing.assert_close(functional(params), users, rtol=1e-12, atol=1e-12)
    r, jacobian = functional.jacobian(params)
    torch.testing.assert_close(r, users, rtol=1e-12, atol=1e-12)
    assert jacobian.shape == (len(users), sum(p.numel() for p in model.parameters()))


@pytest.mark.parametrize("name", list(TASKS))
def test_the_loss_is_half_the_mean_square_of_every_term(name):
    pde, model, points = tiny(name)
    terms = pde.residuals(model, points)
    expected = sum(0.5 * terms[t].square().mean() for t in pde.terms)
    torch.testing.assert_close(half_squared_norm(residual_vector(pde, model, points)), expected)


@pytest.mark.parametrize("name", list(TASKS))
def test_the_exact_solution_has_zero_residual_both_ways(name):
    pde = TASKS[name].pde
    points = pde.sample({t: 50 for t in pde.terms}, torch.Generator().manual_seed(2))
    for term, r in pde.residuals(Exact(pde), points).items():
        assert r.abs().max() < 1e-11, term
        at_points = vmap(lambda x, term=term: pde.point_residual(term, pde.exact, x))
        assert at_points(points[term]).abs().max() < 1e-11, term


def test_a_net_is_not_a_solution():
    pde, model, points = tiny("poisson2d")
    assert residual_vector(pde, model, points).abs().max() > 1e-3


@pytest.mark.parametrize("dim", [2, 5])
def test_the_laplacian_matches_a_polynomials_both_ways(dim):
    x = torch.rand(9, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    u, xg = ops.evaluate_with_input_grad(Polynomial(), x)
    expected = 6 * x.sum(-1)  # Δ(Σ xᵢ³ + x₀x₁) = 6 Σ xᵢ
    torch.testing.assert_close(ops.laplacian(u, xg), expected)
    point = lambda z: (z**3).sum() + z[0] * z[1]  # noqa: E731
    torch.testing.assert_close(vmap(lambda z: ops.point_laplacian(point, z))(x), expected)
    gradient = 3 * x**2 + torch.stack([x[:, 1], x[:, 0]] + [0 * x[:, 0]] * (dim - 2), 1)
    torch.testing.assert_close(ops.gradient(u, xg), gradient)
    torch.testing.assert_close(vmap(lambda z: ops.point_gradient(point, z))(x), gradient)


def test_the_heat_residual_of_a_polynomial_is_its_closed_form():
    # u = x² + t: ∂ₜu − ¼∂ₓ²u = 1 − ½; u(x, 0) − sin πx = x² − sin πx; u on x ∈ {0, 1}.
    class Quadratic(nn.Module):
        def forward(self, z):
            return (z[:, 0] ** 2 + z[:, 1]).unsqueeze(-1)

    pde = Heat1D()
    points = pde.sample({"interior": 8, "initial": 5, "boundary": 6},
                        torch.Generator().manual_seed(4))  # fmt: skip
    r = pde.residuals(Quadratic(), points)
    torch.testing.assert_close(r["interior"], torch.full((8,), 0.5, dtype=torch.float64))
    x0 = points["initial"][:, 0]
    torch.testing.assert_close(r["initial"], x0**2 - torch.sin(math.pi * x0))
    xb, tb = points["boundary"].unbind(1)
    torch.testing.assert_close(r["boundary"], xb**2 + tb)


def test_the_manufactured_right_hand_sides_are_minus_the_laplacians():
    x = torch.rand(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for solution in (SIN_PRODUCT, COS_SUM):
        laplacians = vmap(lambda z, s=solution: ops.point_laplacian(s.value, z))(x)
        torch.testing.assert_close(solution.forcing(x), -laplacians)
    torch.testing.assert_close(  # the paper's 2d right-hand side, 2π² sin πx sin πy
        SIN_PRODUCT.forcing(x[:, :2]),
        2 * math.pi**2 * torch.sin(math.pi * x[:, 0]) * torch.sin(math.pi * x[:, 1]),
    )


def _on_boundary(x: torch.Tensor) -> torch.Tensor:
    return ((x == 0) | (x == 1)).any(dim=1)


@pytest.mark.parametrize("dim", [2, 5])
def test_poisson_points_fill_the_cube_and_cover_every_face(dim):
    pde = Poisson(dim, COS_SUM)
    points = pde.sample({"interior": 300, "boundary": 400}, torch.Generator().manual_seed(6))
    assert points["interior"].shape == (300, dim) and points["boundary"].shape == (400, dim)
    assert points["interior"].dtype == torch.float64
    for x in points.values():
        assert ((x >= 0) & (x <= 1)).all()
    assert not _on_boundary(points["interior"]).any()
    assert _on_boundary(points["boundary"]).all()
    faces = {(i, v) for x in points["boundary"] for i in range(dim) for v in (0.0, 1.0)
             if x[i] == v}  # fmt: skip
    assert len(faces) == 2 * dim


def test_heat_points_lie_on_the_initial_line_and_both_ends():
    points = Heat1D().sample({"interior": 90, "initial": 60, "boundary": 60},
                             torch.Generator().manual_seed(7))  # fmt: skip
    assert {t: len(x) for t, x in points.items()} == {"interior": 90, "initial": 60,
                                                      "boundary": 60}  # fmt: skip
    assert (points["initial"][:, 1] == 0).all()
    assert set(points["boundary"][:, 0].tolist()) == {0.0, 1.0}
    for x in points.values():
        assert ((x >= 0) & (x <= 1)).all()


def test_the_registry_is_the_papers_four_tasks():
    counts = {name: sum(p.numel() for p in t.build().parameters()) for name, t in TASKS.items()}
    assert counts == {"poisson2d": 257, "heat1d": 257, "poisson5d": 449, "poisson5d-deep": 10065}
    assert TASKS["poisson2d"].counts == {"interior": 900, "boundary": 120}
    assert TASKS["heat1d"].counts == {"interior": 900, "initial": 60, "boundary": 60}
    assert TASKS["poisson5d"].counts == {"interior": 3000, "boundary": 500}
    assert [t.resample for t in TASKS.values()] == [False, False, True, True]
    assert TASKS["poisson2d"].shrunk(0.1).counts == {"interior": 90, "boundary": 12}


def test_the_same_generator_seed_draws_the_same_points():
    pde = TASKS["poisson5d"].pde
    a, b = (pde.sample({"interior": 5, "boundary": 5}, torch.Generator().manual_seed(8))
            for _ in range(2))  # fmt: skip
    for t in pde.terms:
        assert torch.equal(a[t], b[t])
