"""The trust-region test stage: the rounding tolerance, the verdict, and the update it tests."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from cases import tiny_problem

from curveball import _damping, _layout
from curveball._rollback import Rollback
from curveball._state import CurveBallState
from curveball._step_info import StepInfo
from curveball._trust_region import (
    HALVINGS,
    ROUNDING_UNITS,
    backtrack,
    judge,
    rose,
    rounding,
    trial_update,
)

HYPER = {"lambda_factor": 0.9, "lambda_interval": 2, "lambda_thresholds": (0.25, 0.75),
         "lambda_min": 0.0, "reject_uphill": True}  # fmt: skip


def info(loss=1.0, predicted=-0.1, lambd=0.5) -> StepInfo:
    return StepInfo(5, loss, 0.9, 0.1, lambd, lambd, predicted)


def test_rounding_is_units_of_the_dtype_precision():
    assert rounding(2.0, torch.float32) == ROUNDING_UNITS * torch.finfo(torch.float32).eps * 2
    assert rounding(-3.0, torch.float64) == ROUNDING_UNITS * torch.finfo(torch.float64).eps * 3
    assert not rose(1.0, 1.0 + 0.5 * rounding(1.0, torch.float32), torch.float32)
    assert rose(1.0, 1.0 + 2.0 * rounding(1.0, torch.float32), torch.float32)


@pytest.mark.parametrize(("trial", "factor"), [(0.9, 0.81), (0.95, 1.0), (0.99, 1 / 0.81)])
def test_the_verdict_follows_the_damping_rule(trial, factor):
    verdict = judge(info(), trial, torch.float64, HYPER)
    ratio = (trial - 1.0) / -0.1
    assert verdict.ratio == pytest.approx(ratio)
    omega = _damping.omega(0.9, 2)
    expected = _damping.adjust_damping(0.5, ratio, (0.25, 0.75), omega, 0.0)
    assert verdict.lambd == pytest.approx(expected) == pytest.approx(0.5 * factor)
    assert not verdict.rejected


def test_a_risen_loss_is_rejected_and_doubles_the_damping():
    verdict = judge(info(), 1.2, torch.float64, HYPER)
    assert verdict.rejected and verdict.ratio < 0
    assert verdict.lambd == pytest.approx(2 * 0.5 / _damping.omega(0.9, 2))
    assert not judge(info(), 1.2, torch.float64, {**HYPER, "reject_uphill": False}).rejected


def test_changes_within_rounding_measure_nothing():
    tiny = rounding(1.0, torch.float32) / 4
    verdict = judge(info(predicted=-tiny), 1.0 + tiny, torch.float32, HYPER)
    assert verdict.ratio is None and verdict.lambd == 0.5 and not verdict.rejected


def layout_and_rollback():
    model, x, _ = tiny_problem()
    layout = _layout.build([{"params": list(model.parameters())}], model, "auto", print, None)
    _layout.attach_state(layout, defaultdict(dict), False)
    for z in layout.zs:
        z.normal_()
    return model, layout, Rollback(layout)


def moved(layout):
    def update():
        with torch.no_grad():
            for z, p in zip(layout.zs, layout.params, strict=True):
                z.mul_(3.0)
                p.add_(z)

    return update


@pytest.mark.parametrize(("trial", "outcome"), [(math.nan, "non-finite"), (1.5, "rejected"),
                                                (0.9, "accepted")])  # fmt: skip
def test_the_update_is_undone_exactly_when_it_must_not_stand(trial, outcome):
    model, layout, rollback = layout_and_rollback()
    zs, ws = [z.clone() for z in layout.zs], [p.detach().clone() for p in layout.params]
    state = CurveBallState(lambd=0.5, rho=0.9, beta=0.1)
    record, warning = trial_update(info(), state, HYPER, rollback, moved(layout),
                                  lambda: (trial, torch.float64))  # fmt: skip
    if outcome == "non-finite":
        assert warning == "non-finite" and state.sizes == (0.9, 0.1)
        assert all(torch.equal(a, b) for a, b in zip(layout.zs, zs, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(layout.params, ws, strict=True))
    elif outcome == "rejected":
        assert "rejected" in warning and record.skipped and state.sizes is None
        assert all(torch.equal(a, b) for a, b in zip(layout.params, ws, strict=True))
        assert all(not z.any() for z in layout.zs)
        assert state.lambd == pytest.approx(2 * 0.5 / _damping.omega(0.9, 2))
    else:
        assert warning == "" and not record.skipped and record.trust_ratio == pytest.approx(1.0)
        assert all(torch.equal(a, 3 * b) for a, b in zip(layout.zs, zs, strict=True))


class Line:
    """A trial loss along the step: ``loss(t)`` at the fraction ``t`` of it."""

    def __init__(self, loss):
        self.loss, self.fraction, self.shrunk = loss, 1.0, []

    def shrink(self, factor):
        self.fraction *= factor
        self.shrunk.append(factor)

    def trial(self):
        return self.loss(self.fraction), torch.float64


def test_the_line_search_halves_until_the_loss_falls():
    line = Line(lambda t: (t - 0.2) ** 2 + 0.9)  # L(w) = 0.94: the full step rises, t ≤ 0.25 falls
    assert backtrack(0.94, line, line.trial) == 0.25
    assert line.shrunk == [0.5, 0.5]


def test_a_line_search_that_finds_no_descent_gives_up():
    line = Line(lambda t: 2.0 + t)
    assert backtrack(1.0, line, line.trial) is None and len(line.shrunk) == HALVINGS


def test_with_the_line_search_a_rising_step_is_shortened_not_rejected():
    model, layout, rollback = layout_and_rollback()
    ws = [p.detach().clone() for p in layout.params]
    calls = iter([1.5, 1.2, 0.95])  # the full step and half of it rise, a quarter falls
    state = CurveBallState(lambd=0.5, rho=0.9, beta=0.1)
    hyper = {**HYPER, "line_search": True}
    record, warning = trial_update(info(), state, hyper, rollback, moved(layout),
                                   lambda: (next(calls), torch.float64))  # fmt: skip
    assert warning == "" and not record.skipped and record.step_length == 0.25
    assert state.lambd == pytest.approx(0.5 / _damping.omega(0.9, 2))
    for p, w, z in zip(layout.params, ws, layout.zs, strict=True):
        torch.testing.assert_close(p, w + z, rtol=1e-14, atol=1e-14)  # z is the quarter step
