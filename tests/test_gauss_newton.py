"""The dense Gauss-Newton matrix and its damped inverse, against the dense oracle."""

from __future__ import annotations

import pytest
import torch
from cases import flat_state, tiny_problem

from benchmarks.oracles import dense_problem
from curveball import CurveBall
from curveball._curvature.engine_choice import EngineChoice
from curveball._curvature.loss_derivatives import LossDerivatives
from curveball._curvature.module_tensors import ModuleTensors
from curveball._gauss_newton import DenseInverse, gauss_newton


@pytest.mark.parametrize("batch", [4, 40])  # fewer predictions than parameters (rows), more
@pytest.mark.parametrize("mode", ["forward", "double-backward"])
def test_the_matrix_is_the_dense_one(batch, mode):
    model, x, loss_fn = tiny_problem(batch=batch)
    params = list(model.parameters())
    choice = EngineChoice(params, ModuleTensors(model, params), mode)

    def build(engine):
        y, _ = engine.linearize(lambda: model(x), [torch.zeros_like(p) for p in params])
        return gauss_newton(engine, params, LossDerivatives(loss_fn, y))

    try:
        matrix, gradient = choice.run(build, lambda: None)
    finally:
        choice.engine.finish()
    dense = dense_problem(model, x, loss_fn)
    torch.testing.assert_close(matrix, dense["G"], rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(gradient, dense["g"], rtol=1e-11, atol=1e-13)


def test_the_damped_inverse_solves_the_damped_system():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, generator=g, dtype=torch.float64)
    matrix = a @ a.T  # rank 4: singular
    inverse = DenseInverse(matrix)
    v = [torch.randn(2, 3, generator=g, dtype=torch.float64)]
    # the null space's eigenvalues count as the floor (1e-12 of the largest): at damping
    # 1e-3 that moves the solve by about 1e-8 relative, at 1 by 1e-11
    for damping, rtol in ((1e-3, 1e-7), (1.0, 1e-10)):
        solved = inverse.apply(v, damping)[0].reshape(-1)
        expected = torch.linalg.solve(matrix + damping * torch.eye(6, dtype=torch.float64),
                                      v[0].reshape(-1))  # fmt: skip
        torch.testing.assert_close(solved, expected, rtol=rtol, atol=0.0)
    assert torch.isfinite(inverse.apply(v, 0.0)[0]).all()  # bounded at λ = 0


@pytest.mark.parametrize("batch", [4, 40])
def test_one_step_with_the_gauss_newton_preconditioner_is_the_damped_newton_step(batch):
    model, x, loss_fn = tiny_problem(batch=batch)
    lambd = 0.3
    opt = CurveBall(model, lr=0.0, lambd=lambd, auto_lambda=False, precondition="gauss-newton")
    opt.step(lambda: model(x), loss_fn)
    dense = dense_problem(model, x, loss_fn)
    n = dense["w"].numel()
    newton = -torch.linalg.solve(dense["G"] + lambd * torch.eye(n, dtype=torch.float64),
                                 dense["g"])  # fmt: skip
    assert (flat_state(opt, model) - newton).norm() <= 1e-9 * newton.norm()
    assert opt.last.beta == pytest.approx(1.0, rel=1e-9)  # the plane finds the exact step


def test_a_stale_matrix_with_conjugate_inner_steps_still_reaches_the_newton_step():
    model, x, loss_fn = tiny_problem(batch=20)
    opt = CurveBall(model, lr=0.1, lambd=0.3, auto_lambda=False, precondition="gauss-newton",
                    precondition_interval=100, inner_steps=30, solver="conjugate")  # fmt: skip
    opt.step(lambda: model(x), loss_fn)  # forms G at the first point, then moves away
    torch.nn.init.zeros_(opt.state[next(model.parameters())]["z"])
    opt.param_groups[0]["lr"] = 0.0
    opt.step(lambda: model(x), loss_fn)  # G is stale now
    dense = dense_problem(model, x, loss_fn)
    n = dense["w"].numel()
    newton = -torch.linalg.solve(dense["G"] + 0.3 * torch.eye(n, dtype=torch.float64), dense["g"])
    assert (flat_state(opt, model) - newton).norm() <= 1e-8 * newton.norm()
