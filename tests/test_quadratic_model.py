"""The quadratic model: its assembly, the 2×2 solve for ρ, β and M(z'), against closed forms."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curveball._plan import Plan
from curveball._quadratic_model import QuadraticModel, convexified, decide
from curveball._step_scalars import CURVATURE_TERMS, StepScalars

finite = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False)


def quadratic(a11, a12, a22, b1, b2, rho, beta):
    """M(z') for z' = ρ z − β Δz, from the 2×2 coefficients."""
    return rho * b2 - beta * b1 + 0.5 * (rho**2 * a22 - 2 * rho * beta * a12 + beta**2 * a11)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=6, max_size=6), st.floats(1e-3, 10.0))
def test_automatic_step_sizes_solve_the_system(values, shift):
    m = np.array(values[:4]).reshape(2, 2)
    k = m @ m.T + shift * np.eye(2)  # symmetric positive definite
    b = np.array(values[4:])
    sizes = QuadraticModel(k[0, 0], k[0, 1], k[1, 1], b[0], b[1]).solve()
    beta, minus_rho = np.linalg.solve(k, b)
    assert sizes.beta == pytest.approx(beta, rel=1e-7, abs=1e-9)
    assert sizes.rho == pytest.approx(-minus_rho, rel=1e-7, abs=1e-9)
    assert sizes.predicted_change == pytest.approx(
        -0.5 * (beta * b[0] + minus_rho * b[1]), rel=1e-7, abs=1e-9
    )


def test_zero_z_gives_a_step_along_delta_z_only():
    sizes = QuadraticModel(a11=4.0, a12=0.0, a22=0.0, b1=2.0, b2=0.0).solve()
    assert (sizes.rho, sizes.beta) == (0.0, 0.5)
    assert sizes.predicted_change == pytest.approx(-0.5)


def test_collinear_z_and_delta_z_give_the_line_minimiser():
    # Δz = 2 z: the plane is a line; every minimiser on it has the same value, and the solve
    # returns a finite one.
    a22, b2 = 3.0, -1.5  # zᵀAz, gᵀz
    a12, a11, b1 = 2 * a22, 4 * a22, 2 * b2
    sizes = QuadraticModel(a11, a12, a22, b1, b2).solve()
    assert math.isfinite(sizes.rho) and math.isfinite(sizes.beta)
    line_min = -0.5 * b2**2 / a22
    assert quadratic(a11, a12, a22, b1, b2, sizes.rho, sizes.beta) == pytest.approx(line_min)
    assert sizes.predicted_change == pytest.approx(line_min)


def test_badly_scaled_system_is_solved_accurately():
    # |Δz| ≪ |z| near convergence: a11 ~ 1e-14 a22, yet the system is well posed.
    k = np.array([[1e-14, 3e-8], [3e-8, 1.0]])
    b = np.array([2e-8, 0.4])
    sizes = QuadraticModel(k[0, 0], k[0, 1], k[1, 1], b[0], b[1]).solve()
    beta, minus_rho = np.linalg.solve(k, b)
    assert sizes.beta == pytest.approx(beta, rel=1e-6)
    assert sizes.rho == pytest.approx(-minus_rho, rel=1e-6)


def test_fixed_values_minimise_over_the_other_one():
    a11, a12, a22, b1, b2 = 2.0, 0.5, 1.0, 1.0, -0.3
    sizes = QuadraticModel(a11, a12, a22, b1, b2).solve(rho=0.9)
    grid = np.linspace(sizes.beta - 1, sizes.beta + 1, 2001)
    best = grid[np.argmin([quadratic(a11, a12, a22, b1, b2, 0.9, g) for g in grid])]
    assert sizes.beta == pytest.approx(best, abs=1e-3) and sizes.rho == 0.9
    sizes = QuadraticModel(a11, a12, a22, b1, b2).solve(beta=0.2)
    grid = np.linspace(sizes.rho - 1, sizes.rho + 1, 2001)
    best = grid[np.argmin([quadratic(a11, a12, a22, b1, b2, r, 0.2) for r in grid])]
    assert sizes.rho == pytest.approx(best, abs=1e-3) and sizes.beta == 0.2


def test_model_is_assembled_from_named_scalars_with_damping_and_weight_decay():
    # two groups: λ = 0.5, κ = (0.1, 0.0); the λ and κ terms weigh each group's inner products
    scalars = StepScalars(
        loss=1.0,
        predictions_finite=True,
        curvature=dict(zip(CURVATURE_TERMS, (2.0, 0.3, 1.5, -0.7, 0.4), strict=True)),
        groups={
            "dz_dz": (1.0, 2.0),
            "z_dz": (0.5, -0.5),
            "z_z": (3.0, 1.0),
            "w_dz": (0.2, 9.0),
            "w_z": (-0.1, 9.0),
        },
    )
    model = QuadraticModel.assemble(scalars, 0.5, (0.1, 0.0))
    assert model.a11 == pytest.approx(2.0 + 0.6 * 1.0 + 0.5 * 2.0)
    assert model.a12 == pytest.approx(0.3 + 0.6 * 0.5 + 0.5 * -0.5)
    assert model.a22 == pytest.approx(1.5 + 0.6 * 3.0 + 0.5 * 1.0)
    assert model.b1 == pytest.approx(-0.7 + 0.1 * 0.2)  # the κ w part of the gradient
    assert model.b2 == pytest.approx(0.4 + 0.1 * -0.1)
    sizes = model.solve()
    assert sizes.predicted_change == pytest.approx(model.change(sizes.rho, sizes.beta))


def test_an_indefinite_network_curvature_is_replaced_by_its_positive_part():
    terms = dict(zip(CURVATURE_TERMS, (1.0, 2.0, -0.5, 0.3, 0.2), strict=True))
    out, indefinite = convexified(terms)
    n = np.array([[1.0, 2.0], [2.0, -0.5]])
    values, vectors = np.linalg.eigh(n)
    expected = vectors @ np.diag(np.maximum(values, 0.0)) @ vectors.T
    got = np.array([[out["jdz_h_jdz"], out["jz_h_jdz"]], [out["jz_h_jdz"], out["jz_h_jz"]]])
    assert indefinite and np.allclose(got, expected, rtol=1e-12, atol=1e-14)
    assert (out["jl_jdz"], out["jl_jz"]) == (0.3, 0.2)
    psd = dict(zip(CURVATURE_TERMS, (1.0, 0.5, 2.0, 0.3, 0.2), strict=True))
    assert convexified(psd) == (psd, False)
    first_step = dict(zip(CURVATURE_TERMS, (-3.0, 0.0, 0.0, 0.3, 0.0), strict=True))
    out, indefinite = convexified(first_step)  # z = 0: only (JΔz)ᵀH_L(JΔz), and it is negative
    assert indefinite and out["jdz_h_jdz"] == out["jz_h_jdz"] == out["jz_h_jz"] == 0.0


# --------------------------------------------------------------------------- decide
def step_scalars(loss=1.0, finite=True, dz_dz=4.0, curvature=None, **groups):
    terms = curvature or {"jdz_h_jdz": 3.0, "jz_h_jdz": 0.5, "jz_h_jz": 1.0, "jl_jdz": 2.0,
                          "jl_jz": 0.3}  # fmt: skip
    base = {"dz_dz": (dz_dz,), "z_dz": (0.2,), "z_z": (0.5,)}
    return StepScalars(loss, finite, terms, {**base, **groups})


PLAN = Plan(step=4, lambd=0.1, refresh=True, trial=False, loss_scale=None, precondition=None,
            curvature_fraction=1.0)  # fmt: skip
AUTO = {"momentum": None, "beta": None}


@pytest.mark.parametrize(
    ("scalars", "plan", "reason"),
    [(step_scalars(loss=math.nan), PLAN, "non-finite loss"),
     (step_scalars(finite=False), PLAN, "non-finite predictions"),
     (step_scalars(dz_dz=math.inf), PLAN, "non-finite Δz"),
     (step_scalars(dz_dz=math.inf), replace(PLAN, loss_scale=1024.0),
      "float16 overflow of the loss scale 1024"),
     (step_scalars(curvature={**step_scalars().curvature, "jz_h_jz": math.nan}), PLAN,
      "non-finite J Δz or 2×2 system")],
)  # fmt: skip
def test_a_step_that_cannot_be_taken_is_skipped_with_its_reason(scalars, plan, reason):
    info, _ = decide(scalars, plan, AUTO, (0.5, 0.2), (0.0,))
    assert info.skipped and info.reason == reason


def test_the_decision_is_the_models_minimiser():
    scalars = step_scalars()
    info, indefinite = decide(scalars, PLAN, AUTO, None, (0.0,))
    sizes = QuadraticModel.assemble(scalars, 0.1, (0.0,)).solve()
    assert not indefinite and not info.skipped and info.refreshed
    assert (info.rho, info.beta, info.predicted_change) == (sizes.rho, sizes.beta,
                                                            sizes.predicted_change)  # fmt: skip


def test_between_refreshes_the_last_sizes_are_reused_or_the_fixed_ones():
    no_refresh = replace(PLAN, refresh=False)
    info, _ = decide(step_scalars(), no_refresh, AUTO, (0.5, 0.2), (0.0,))
    assert (info.rho, info.beta, info.refreshed) == (0.5, 0.2, False)
    assert math.isnan(info.predicted_change)
    info, _ = decide(step_scalars(), no_refresh, {"momentum": 0.9, "beta": None}, (0.5, 0.2), (0,))
    assert (info.rho, info.beta) == (0.9, 0.2)


def test_an_indefinite_system_is_reported_and_convexified():
    curvature = {"jdz_h_jdz": -3.0, "jz_h_jdz": 0.5, "jz_h_jz": 1.0, "jl_jdz": 2.0, "jl_jz": 0.3}
    info, indefinite = decide(step_scalars(curvature=curvature), PLAN, AUTO, None, (0.0,))
    assert indefinite and not info.skipped and info.predicted_change < 0


def test_no_descent_direction_is_a_skip_that_says_so():
    zero = dict.fromkeys(CURVATURE_TERMS, 0.0) | {"jl_jdz": 1.0}
    scalars = StepScalars(1.0, True, zero, {"dz_dz": (0.0,), "z_dz": (0.0,), "z_z": (0.0,)})
    info, _ = decide(scalars, replace(PLAN, lambd=0.0), AUTO, None, (0.0,))
    assert info.skipped and info.reason.startswith("no move")
