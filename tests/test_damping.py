"""The damping rule: which way λ moves, by how much, from zero and down to a floor."""

from __future__ import annotations

import math

import pytest
from cases import tiny_problem

from curveball import CurveBall
from curveball._damping import (
    LAMBDA_FLOOR,
    adjust_damping,
    after_rejection,
    omega,
    raise_damping,
    trust_ratio,
)


def test_damping_rule_directions():
    w = omega(0.999, 5)
    assert w == pytest.approx(0.999**5)
    assert adjust_damping(1.0, 0.1, (0.5, 1.5), w) == pytest.approx(1.0 / w)
    assert adjust_damping(1.0, -3.0, (0.5, 1.5), w) == pytest.approx(1.0 / w)
    assert adjust_damping(1.0, 2.0, (0.5, 1.5), w) == pytest.approx(w)
    assert adjust_damping(1.0, 1.0, (0.5, 1.5), w) == 1.0
    assert adjust_damping(1.0, math.nan, (0.5, 1.5), w) == pytest.approx(1.0 / w)
    assert adjust_damping(1.0, None, (0.5, 1.5), w) == 1.0
    assert trust_ratio(-1.0, -2.0) == 0.5 and trust_ratio(1.0, 0.0) is None


def test_changes_within_rounding_measure_nothing():
    # both within the resolution: no ratio, whatever their signs
    assert trust_ratio(-0.0, -1e-19, resolution=1e-15) is None
    assert trust_ratio(3e-16, -1e-19, resolution=1e-15) is None
    # a change beyond it is measured, even against a prediction within it
    assert trust_ratio(2e-15, -1e-19, resolution=1e-15) == pytest.approx(-2e4)
    assert trust_ratio(-1e-3, -2e-3, resolution=1e-15) == 0.5


def test_zero_damping_can_grow():
    w = omega(0.999, 5)
    assert adjust_damping(0.0, 0.1, (0.5, 1.5), w) == LAMBDA_FLOOR
    assert raise_damping(0.0, w) == LAMBDA_FLOOR
    assert raise_damping(LAMBDA_FLOOR, w) == pytest.approx(LAMBDA_FLOOR / w)
    assert adjust_damping(0.0, 2.0, (0.5, 1.5), w) == 0.0  # shrinking stays at zero


def test_factor_one_keeps_lambda():
    assert raise_damping(0.3, 1.0) == 0.3
    assert adjust_damping(0.3, 0.1, (0.5, 1.5), 1.0) == 0.3


def test_a_rejection_doubles_lambda_even_from_zero():
    assert after_rejection(0.3) == 0.6
    assert after_rejection(0.0) == LAMBDA_FLOOR
    assert after_rejection(after_rejection(0.0)) == 2 * LAMBDA_FLOOR


def test_the_minimum_stops_shrinking_only():
    w = 0.5
    assert adjust_damping(1.0, 2.0, (0.5, 1.5), w, minimum=0.7) == 0.7  # 0.5 would be below
    assert adjust_damping(1.0, 2.0, (0.5, 1.5), w, minimum=0.3) == 0.5  # above: the rule's
    assert adjust_damping(0.2, 2.0, (0.5, 1.5), w, minimum=0.3) == 0.2  # below: not raised
    assert adjust_damping(1.0, 0.1, (0.5, 1.5), w, minimum=5.0) == 2.0  # growth: the rule's


def test_an_optimizer_with_a_floor_keeps_lambda_above_it():
    # the Levenberg-Marquardt factor on a model that predicts its steps well: λ keeps
    # shrinking at every test, down to the floor and no further
    lambdas = {}
    for floor in (0.0, 0.05):
        model, x, loss_fn = tiny_problem(3)
        opt = CurveBall(
            model, lambd=0.5, lambda_factor=(2 / 3) ** 0.2, lambda_thresholds=(0.25, 0.75),
            lambda_min=floor,
        )  # fmt: skip
        seen = []
        for _ in range(60):
            opt.step(lambda model=model, x=x: model(x), loss_fn)
            seen.append(opt.lambd)
        lambdas[floor] = seen
    assert min(lambdas[0.0]) < 0.05  # without the floor λ goes below it
    assert min(lambdas[0.05]) == 0.05 and lambdas[0.05][-1] == 0.05


def test_a_negative_floor_is_refused_by_name():
    with pytest.raises(ValueError, match="lambda_min"):
        CurveBall(tiny_problem()[0], lambda_min=-1.0)
