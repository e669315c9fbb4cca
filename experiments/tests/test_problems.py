"""The small problems: their definitions, the shared random draws, the runners."""

from __future__ import annotations

import math

import pytest
import torch

from curveball_experiments import optimizers, problems

CPU = torch.device("cpu")


def test_rosenbrock_residuals_give_the_function() -> None:
    problem = problems.Rosenbrock("test", 3.0)
    xy = torch.tensor([0.3, -0.7], dtype=torch.float64)
    eps = torch.tensor(0.4, dtype=torch.float64)
    r = problem.residuals((xy,), eps)
    expected = (1 - 0.3) ** 2 + 100 * 0.4 * (-0.7 - 0.09) ** 2
    assert float(r.pow(2).sum()) == pytest.approx(expected)


@pytest.mark.parametrize("eps", [0.0, 0.5, 2.9])
def test_one_one_minimises_every_rosenbrock_sample(eps: float) -> None:
    problem = problems.Rosenbrock("test", 3.0)
    xy = torch.ones(2, dtype=torch.float64)
    r = problem.residuals((xy,), torch.tensor(eps, dtype=torch.float64))
    assert float(r.abs().max()) == 0.0
    assert float(problem.error((xy,))) == 0.0


def test_rosenbrock_start_points_lie_in_the_stated_box() -> None:
    problem = problems.Rosenbrock("deterministic", None)
    for seed in range(20):
        (xy,) = problem.initial(seed)
        assert -2 <= xy[0] <= 2 and -1 <= xy[1] <= 3
    assert not torch.equal(problem.initial(0)[0], problem.initial(1)[0])


def test_linear_target_has_the_stated_condition_number() -> None:
    problem = problems.DeepLinear()
    s = torch.linalg.svdvals(problem.target)
    assert problem.target.shape == (10, 10)
    assert float(s.max() / s.min()) == pytest.approx(1e5, rel=1e-6)


def test_linear_residuals_estimate_the_expected_loss() -> None:
    problem = problems.DeepLinear(batch=20000)
    params = problem.initial(3)
    g = torch.Generator().manual_seed(0)
    draw = problem.draw_chunk(g, 1)[0]
    loss = problem.residuals(params, draw).pow(2).sum()
    assert float(loss) == pytest.approx(float(problem.objective(params)), rel=0.05)


def test_draws_are_identical_for_every_consumer() -> None:
    problem = problems.DeepLinear()
    a = problems.DrawStream(problem, 5, CPU)
    b = problems.DrawStream(problem, 5, CPU)
    c = problems.DrawStream(problem, 6, CPU)
    for t in (0, 300, 7, 1000):
        assert torch.equal(a[t], b[t])
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])


def test_levenberg_marquardt_solves_deterministic_rosenbrock() -> None:
    problem = problems.Rosenbrock("deterministic", None)
    trace = problems.run_single(
        problem, 0, lambda m: optimizers.LevenbergMarquardt(m), problems.CAP, CPU
    )
    assert trace.iterations is not None and trace.iterations < 100
    assert len(trace.objective) == trace.iterations + 1 == len(trace.seconds)


def test_grid_search_picks_a_converging_rate_and_stops_early() -> None:
    problem = problems.DeepLinear()
    grid = problems.run_grid(problem, [0, 1], [1e-3, 0.1, 1e3], "SGD", 2000, CPU)
    assert grid.lrs[grid.best] == 0.1
    assert all(h is not None for h in grid.hits[grid.best])
    assert grid.iterations_run < 2000
    assert all(h is None for h in grid.hits[2])  # diverged copies never converge
    summary = grid.summary(2000)
    assert summary[1]["converged"] == 2
    for trace, hit in zip(grid.traces, grid.hits[grid.best], strict=True):
        assert len(trace.objective) == hit + 1
        assert math.isfinite(trace.objective[-1])


def test_grid_copies_follow_single_torch_runs() -> None:
    problem = problems.Rosenbrock("u01", 1.0)
    grid = problems.run_grid(problem, [4], [1e-3], "Adam", 30, CPU, check_every=1000)
    module = problems.ResidualModule(problem, problem.initial(4))
    stepper = optimizers.adam(module.parameters(), 1e-3)
    stream = problems.DrawStream(problem, 4, CPU)
    objective = []
    for t in range(30):
        stepper.step(lambda t=t: module(stream[t]), problems.least_squares)
        with torch.no_grad():
            objective.append(float(problem.objective(module.values())))
    assert grid.traces[0].objective[1:] == pytest.approx(objective, rel=1e-10)
