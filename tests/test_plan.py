"""The plan of a step: which steps refresh ρ and β, test λ, and scale float16."""

from __future__ import annotations

import pytest
import torch

from curveball._plan import plan, reusable
from curveball._state import CurveBallState

HYPER = {"momentum": None, "beta": None, "auto_lambda": True, "lambda_interval": 5,
         "step_size_interval": 1, "precondition": False, "precondition_decay": 0.9,
         "precondition_eps": 1e-8, "curvature_fraction": 1.0}  # fmt: skip
PARAMS = [torch.zeros(3)]


def plans(hyper, steps, sizes=(0.5, 0.1)):
    state = CurveBallState(lambd=0.3, rho=sizes[0], beta=sizes[1])
    out = []
    for step in range(steps):
        state.step = step
        out.append(plan(state, hyper, PARAMS))
    return out


def test_every_lambda_interval_th_step_is_a_trial():
    trials = [p.step for p in plans(HYPER, 20) if p.trial]
    assert trials == [5, 10, 15, 20]
    assert not any(p.trial for p in plans({**HYPER, "auto_lambda": False}, 20))


def test_step_sizes_are_refreshed_every_interval_and_on_trials():
    refreshed = [p.step for p in plans({**HYPER, "step_size_interval": 3}, 12) if p.refresh]
    assert refreshed == [1, 4, 5, 7, 10]


def test_sizes_that_are_not_a_contraction_are_solved_anew():
    hyper = {**HYPER, "step_size_interval": 3}
    assert all(p.refresh for p in plans(hyper, 6, sizes=(-1.6, 0.1)))
    assert all(p.refresh for p in plans(hyper, 6, sizes=(0.5, -0.1)))


@pytest.mark.parametrize(
    ("sizes", "momentum", "beta", "expected"),
    [(None, None, None, False), ((0.5, 0.1), None, None, True), ((1.5, 0.1), None, None, False),
     ((1.5, 0.1), 0.9, None, True), ((0.5, -1.0), None, 0.1, True), ((0.5, -1.0), None, None,
     False)],
)  # fmt: skip
def test_reusable(sizes, momentum, beta, expected):
    assert reusable(sizes, {"momentum": momentum, "beta": beta}) is expected


def test_fixed_sizes_never_refresh_except_on_trials():
    hyper = {**HYPER, "momentum": 0.9, "beta": 0.01}
    assert [p.step for p in plans(hyper, 10) if p.refresh] == [5, 10]


def test_the_plan_carries_lambda_the_preconditioner_and_the_float16_scale():
    (p,) = plans({**HYPER, "precondition": True}, 1)
    assert p.lambd == 0.3 and p.precondition == (0.9, 1e-8) and p.loss_scale is None
    state = CurveBallState(lambd=1.0, loss_scale=128.0)
    assert plan(state, HYPER, [torch.zeros(2, dtype=torch.float16)]).loss_scale == 128.0
    assert plan(state, {**HYPER, "curvature_fraction": 0.25}, PARAMS).minibatch


@pytest.mark.parametrize(
    ("interval", "rank", "matrix", "new", "expected_rank"),
    [("auto", "auto", True, list(range(1, 13)), 128), ("auto", "auto", False, [1, 11], 64),
     (3, 32, True, [1, 4, 7, 10], 32), ("auto", 32, False, [1, 11], 32)],
)  # fmt: skip
def test_auto_forms_the_sketch_every_step_only_where_the_jacobian_is_a_matrix(
    interval, rank, matrix, new, expected_rank
):
    hyper = {**HYPER, "precondition": "nystrom", "precondition_interval": interval,
             "precondition_rank": rank}  # fmt: skip
    state = CurveBallState(lambd=0.3)
    steps = []
    for step in range(12):
        state.step = step
        steps.append(plan(state, hyper, PARAMS, jacobian_given=matrix, matrix=matrix))
    assert [p.step for p in steps if p.new_inverse] == new
    assert {p.rank for p in steps} == {expected_rank}
