"""The inner loop: several iterations on one quadratic model, against the dense Newton step."""

from __future__ import annotations

import pytest
import torch
from cases import flat_state, tiny_problem

from benchmarks.oracles import dense_problem
from curveball import CurveBall


def newton(model, x, loss_fn, lambd):
    dense = dense_problem(model, x, loss_fn)
    n = dense["w"].numel()
    system = dense["G"] + lambd * torch.eye(n, dtype=torch.float64)
    step = -torch.linalg.solve(system, dense["g"])
    return step, float(dense["g"] @ step + 0.5 * step @ system @ step)


@pytest.mark.parametrize("mode", ["forward", "double-backward"])
def test_conjugate_directions_reach_the_damped_newton_step_in_one_step(mode):
    model, x, loss_fn = tiny_problem()
    n = sum(p.numel() for p in model.parameters())
    opt = CurveBall(model, lr=0.0, lambd=1.0, auto_lambda=False, precondition=False,
                    inner_steps=n, solver="conjugate", forward_mode=mode)  # fmt: skip
    opt.step(lambda: model(x), loss_fn)
    step, change = newton(model, x, loss_fn, 1.0)
    assert (flat_state(opt, model) - step).norm() <= 1e-9 * step.norm()
    assert opt.last.inner_steps == n
    assert opt.last.predicted_change == pytest.approx(change, rel=1e-9)


def test_the_papers_inner_iteration_converges_too_and_each_iteration_is_a_step():
    model, x, loss_fn = tiny_problem()
    inner = CurveBall(model, lr=0.0, lambd=1.0, auto_lambda=False, precondition=False,
                      inner_steps=7)  # fmt: skip
    inner.step(lambda: model(x), loss_fn)
    twin, x2, loss2 = tiny_problem()
    outer = CurveBall(twin, lr=0.0, lambd=1.0, auto_lambda=False, precondition=False)
    for _ in range(7):  # at lr = 0, seven steps iterate the same model seven times
        outer.step(lambda: twin(x2), loss2)
    torch.testing.assert_close(flat_state(inner, model), flat_state(outer, twin), rtol=1e-10,
                               atol=1e-12)  # fmt: skip
    assert inner.last.predicted_change == pytest.approx(outer.last.predicted_change, rel=1e-9)


def test_conjugate_gradients_need_fewer_iterations_than_the_papers_plane():
    errors = {}
    for solver in ("curveball", "conjugate"):
        model, x, loss_fn = tiny_problem()
        opt = CurveBall(model, lr=0.0, lambd=0.01, auto_lambda=False, precondition=False,
                        inner_steps=20, solver=solver)  # fmt: skip
        opt.step(lambda model=model, x=x: model(x), loss_fn)
        step, _ = newton(model, x, loss_fn, 0.01)
        errors[solver] = float((flat_state(opt, model) - step).norm() / step.norm())
    assert errors["conjugate"] < 0.1 * errors["curveball"]


def test_an_iteration_that_cannot_be_taken_ends_the_loop_on_the_last_finite_z(monkeypatch):
    from curveball import _inner_loop

    def run(steps):
        model, x, loss_fn = tiny_problem()
        opt = CurveBall(model, lambd=1.0, auto_lambda=False, precondition=False,
                        inner_steps=steps, solver="conjugate")  # fmt: skip
        opt.step(lambda: model(x), loss_fn)
        return opt, model

    reference, ref_model = run(2)
    original, calls = _inner_loop.next_z, []

    def failing_third(*args, **kwargs):  # the third iteration's Δz overflows
        out = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            for d in out.dz:
                d.fill_(float("inf"))
        return out

    monkeypatch.setattr(_inner_loop, "next_z", failing_third)
    opt, model = run(4)
    assert opt.last.inner_steps == 2 and not opt.last.skipped and len(calls) == 2
    assert torch.equal(flat_state(opt, model), flat_state(reference, ref_model))
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_inner_steps_and_a_curvature_minibatch_do_not_combine():
    model, _, _ = tiny_problem()
    with pytest.raises(ValueError, match="do not combine"):
        CurveBall(model, inner_steps=2, curvature_fraction=0.5)
    with pytest.raises(ValueError, match="solver: expected one of"):
        CurveBall(model, solver="newton")
