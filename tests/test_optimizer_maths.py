"""CurveBall's iteration against closed-form and dense oracles (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import flat_state, tiny_problem
from torch import nn

from benchmarks.oracles import dense_problem, flat_params
from curveball import CurveBall


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("mode", ["auto", "double-backward"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_frozen_parameters_drive_z_to_the_damped_newton_step(mode, weight_decay, kind):
    model, x, loss_fn = tiny_problem(kind=kind)
    lambd = 0.5
    opt = CurveBall(
        model, lr=0.0, lambd=lambd, auto_lambda=False, weight_decay=weight_decay, forward_mode=mode
    )
    for _ in range(150):
        opt.step(lambda: model(x), loss_fn)
    dense = dense_problem(model, x, loss_fn)
    n = dense["w"].numel()
    # weight decay κ adds κ w to the gradient and κ to the damping
    system = dense["G"] + (lambd + weight_decay) * torch.eye(n, dtype=torch.float64)
    newton = -torch.linalg.solve(system, dense["g"] + weight_decay * dense["w"])
    z = flat_state(opt, model)
    assert (z - newton).norm() / newton.norm() <= 1e-6


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_step_sizes_minimise_the_model_over_the_plane(kind):
    model, x, loss_fn = tiny_problem(1, kind)
    opt = CurveBall(model, lr=0.0, lambd=0.7, auto_lambda=False, precondition=False)
    for _ in range(3):  # a nonzero z
        opt.step(lambda: model(x), loss_fn)
    dense = dense_problem(model, x, loss_fn)
    z = flat_state(opt, model)
    system = dense["G"] + 0.7 * torch.eye(z.numel(), dtype=torch.float64)
    dz = system @ z + dense["g"]
    opt.step(lambda: model(x), loss_fn)
    rho, beta = opt.last.rho, opt.last.beta

    def model_value(c):  # M(z') with z' = c0 z + c1 Δz
        new = c[0] * z + c[1] * dz
        return dense["g"] @ new + 0.5 * new @ system @ new

    # brute force: minimise the 2-D quadratic by a fine search around the least-squares optimum
    basis = torch.stack([z, dz], dim=1)
    c_star = torch.linalg.lstsq(basis.T @ system @ basis, -basis.T @ dense["g"]).solution
    torch.testing.assert_close(
        torch.tensor([rho, -beta], dtype=torch.float64), c_star, rtol=1e-6, atol=1e-9
    )
    best = model_value(torch.tensor([rho, -beta], dtype=torch.float64))
    grid = torch.linspace(-0.05, 0.05, 21, dtype=torch.float64)
    for d0 in grid:
        for d1 in grid:
            shifted = torch.tensor([rho + d0 * abs(rho), -beta + d1 * abs(beta)])
            assert model_value(shifted.double()) >= best - 1e-14
    assert opt.last.predicted_change == pytest.approx(best.item(), rel=1e-8)
    torch.testing.assert_close(flat_state(opt, model), rho * z - beta * dz, rtol=1e-9, atol=1e-12)


def test_first_step_with_zero_z_is_finite_and_along_the_gradient():
    model, x, loss_fn = tiny_problem(2)
    dense = dense_problem(model, x, loss_fn)
    opt = CurveBall(model, lambd=1.0, precondition=False)
    opt.step(lambda: model(x), loss_fn)
    info = opt.last
    assert info.rho == 0.0 and info.beta > 0.0 and not info.skipped
    # z = 0 → Δz = g, the 2×2 system is singular; its solution is β = gᵀg / gᵀ(G + λI)g
    g = dense["g"]
    beta = (g @ g) / (g @ (dense["G"] + torch.eye(g.numel(), dtype=torch.float64)) @ g)
    assert info.beta == pytest.approx(beta.item(), rel=1e-9)
    torch.testing.assert_close(flat_params(model), dense["w"] - beta * g, rtol=1e-9, atol=1e-12)


def test_linear_least_squares_reaches_the_exact_minimiser():
    torch.manual_seed(3)
    a = torch.randn(40, 6, dtype=torch.float64)
    b = torch.randn(40, 2, dtype=torch.float64)
    model = nn.Linear(6, 2, dtype=torch.float64)
    opt = CurveBall(model)
    rejected = []
    for _ in range(100):
        opt.step(lambda: model(a), lambda y: F.mse_loss(y, b))
        rejected.append(opt.last.skipped)
    assert not any(rejected)  # converged: trial losses equal up to rounding are not a rise
    design = torch.cat([a, torch.ones(40, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, b).solution  # (7, 2)
    torch.testing.assert_close(model.weight.detach(), solution[:6].T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(model.bias.detach(), solution[6], rtol=1e-8, atol=1e-10)


def least_squares_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of a 3-unknown linear least-squares problem (30 samples, float64)."""
    torch.manual_seed(4)
    return torch.randn(30, 3, dtype=torch.float64), torch.randn(30, 1, dtype=torch.float64)


@pytest.mark.parametrize(
    "rule",
    [{}, {"lambda_factor": 0.999, "lambda_thresholds": (0.5, 1.5), "lambda_min": 0.0}],
    ids=["default", "paper"],
)
def test_damping_rule_moves_lambda_the_right_way(rule):
    factor = rule.get("lambda_factor", (2.0 / 3.0) ** 0.2)  # the test is every step: ω = factor
    low, high = rule.get("lambda_thresholds", (0.25, 0.75))
    # On a linear least-squares problem the quadratic model is exact up to the λ term, so the
    # loss falls by more than predicted (r > high for a large λ): the damping must shrink.
    a, b = least_squares_data()
    model = nn.Linear(3, 1, dtype=torch.float64)
    opt = CurveBall(model, lambd=10.0, lambda_interval=1, **rule)
    opt.step(lambda: model(a), lambda y: F.mse_loss(y, b))
    assert opt.last.trust_ratio > high
    assert opt.lambd == pytest.approx(10.0 * factor)
    # A loss that is nearly flat here but explodes further along: the model's predicted decrease
    # is wildly optimistic (the loss goes up), so r < low and λ must grow.
    w = nn.Linear(1, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        w.weight.fill_(0.0)
    one = torch.ones(1, 1, dtype=torch.float64)

    def steep(y):
        return (0.005 * y**2 - 0.1 * y + torch.exp(10 * (y - 1.5))).sum()

    opt = CurveBall(w, lambd=1e-3, lambda_interval=1, reject_uphill=False, **rule)
    opt.step(lambda: w(one), steep)
    assert opt.last.trust_ratio < low
    assert opt.lambd == pytest.approx(1e-3 / factor)
    # The loss even rose (r < 0): by default the step is undone and λ doubles besides.
    with torch.no_grad():
        w.weight.fill_(0.0)
    opt = CurveBall(w, lambd=1e-3, lambda_interval=1, **rule)
    with pytest.warns(RuntimeWarning, match="rejected"):
        opt.step(lambda: w(one), steep)
    assert opt.last.trust_ratio < 0.0 and opt.last.skipped
    assert opt.lambd == pytest.approx(2e-3 / factor) and w.weight.item() == 0.0


def test_the_default_floor_stops_the_shrinking_but_not_a_smaller_start():
    # The least-squares problem of the test above keeps r > 3/4: λ shrinks by ω = 2/3 per test
    # down to lambda_min = 0.05 and stays there; an initial λ below the floor is kept.
    a, b = least_squares_data()
    for start, expected in ((0.1, [0.1 * 2 / 3, 0.05, 0.05]), (0.01, [0.01] * 2)):
        model = nn.Linear(3, 1, dtype=torch.float64)
        opt = CurveBall(model, lambd=start)
        seen = []
        for _ in range(5 * len(expected)):
            opt.step(lambda model=model: model(a), lambda y: F.mse_loss(y, b))
            if opt.steps % 5 == 0:  # a test (a converged one measures nothing: r is None)
                seen.append(opt.last.next_lambd)
                assert opt.last.trust_ratio is None or opt.last.trust_ratio > 0.75
        assert seen == pytest.approx(expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_converged_run_keeps_lambda(dtype):
    # Once the least-squares problem is solved, the model predicts changes far below the
    # loss's rounding (1e-19 and less) and the trial loss differs from the loss by rounding
    # of either sign: such tests must leave λ at the floor, not raise it by 3/2 per test
    # (nor, on a rounding error of the right sign, shrink it).
    a, b = least_squares_data()
    model = nn.Linear(3, 1, dtype=dtype)
    opt = CurveBall(model, lambd=0.1)
    x, t = a.to(dtype), b.to(dtype)
    tests = []
    for _ in range(100):
        opt.step(lambda: model(x), lambda y: F.mse_loss(y, t))
        if opt.steps % 5 == 0:
            tests.append((opt.last.trust_ratio, opt.last.next_lambd))
    # the first test measured r > 3/4 (λ × 2/3), the converged ones nothing (float32 gets
    # there after one test, float64 after two, down to the floor)
    assert tests[0][0] > 0.75 and tests[0][1] == pytest.approx(0.1 * 2 / 3)
    assert [ratio for ratio, _ in tests[-10:]] == [None] * 10
    lambdas = [lambd for _, lambd in tests]
    assert lambdas == sorted(lambdas, reverse=True) and lambdas[-1] >= 0.05
    least_squares = torch.linalg.lstsq(torch.cat([x, torch.ones_like(x[:, :1])], 1), t).solution
    fitted = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    torch.testing.assert_close(fitted, least_squares.reshape(-1))


def test_fixed_momentum_and_beta_are_used_as_given():
    model, x, loss_fn = tiny_problem(5)
    opt = CurveBall(
        model, momentum=0.9, beta=0.01, lambd=1.0, auto_lambda=False, precondition=False
    )
    opt.step(lambda: model(x), loss_fn)
    z1 = flat_state(opt, model).clone()
    dense = dense_problem(model, x, loss_fn)
    opt.step(lambda: model(x), loss_fn)
    system = dense["G"] + torch.eye(z1.numel(), dtype=torch.float64)
    dz = system @ z1 + dense["g"]
    torch.testing.assert_close(flat_state(opt, model), 0.9 * z1 - 0.01 * dz, rtol=1e-9, atol=1e-12)
    assert (opt.last.rho, opt.last.beta) == (0.9, 0.01)


def test_parameter_path_equals_module_path():
    model, x, loss_fn = tiny_problem(6)
    twin, _, _ = tiny_problem(6)
    fast = CurveBall(model)
    bare = CurveBall(twin.parameters())
    for _ in range(12):
        fast.step(lambda: model(x), loss_fn)
        bare.step(lambda: twin(x), loss_fn)
    torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=1e-9, atol=1e-12)
    assert fast.lambd == bare.lambd
