"""The damping rule: which way λ moves, by how much, and from zero."""

from __future__ import annotations

import math

import pytest

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
