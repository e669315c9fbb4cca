"""The automatic step sizes ρ and β: a 2×2 least-squares system, solved on the host.

With ``z' = ρ z − β Δz`` the damped quadratic model

    M(z') = gᵀ z' + ½ z'ᵀ (G + λI) z'

restricted to the plane spanned by ``z`` and ``Δz`` is a quadratic in (β, ρ).
Its minimiser solves (Henriques et al., ICCV 2019, eq. 11)

    [[a11, a12], [a12, a22]] · [β, −ρ]ᵀ = [b1, b2]ᵀ

with ``a11 = Δzᵀ(G + λI)Δz``, ``a12 = zᵀ(G + λI)Δz``, ``a22 = zᵀ(G + λI)z``,
``b1 = gᵀΔz`` and ``b2 = gᵀz``. The system is singular whenever ``z`` and
``Δz`` are parallel, in particular at the first step where ``z = 0``; the
minimum-norm (pseudo-inverse) solution is then the minimiser over the line that
the plane degenerates to, and is always finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StepSizes:
    """The outcome of one solve: ``z' = rho * z - beta * dz`` and ``M(z')``."""

    rho: float
    beta: float
    predicted_change: float


def _pseudo_solve(a11: float, a12: float, a22: float, b1: float, b2: float, rtol: float):
    """Minimum-norm solution of the symmetric 2×2 system, dropping tiny or negative curvature.

    The system is first scaled to a unit diagonal (``z`` and ``Δz`` can differ in
    length by many orders of magnitude near convergence), so that the threshold
    ``rtol`` only discards genuinely collinear directions.
    """
    s1 = 1.0 / math.sqrt(a11) if a11 > 0.0 else 1.0
    s2 = 1.0 / math.sqrt(a22) if a22 > 0.0 else 1.0
    a11, a12, a22, b1, b2 = a11 * s1 * s1, a12 * s1 * s2, a22 * s2 * s2, b1 * s1, b2 * s2
    # Closed-form eigen-decomposition of [[a11, a12], [a12, a22]].
    mean = 0.5 * (a11 + a22)
    radius = math.hypot(0.5 * (a11 - a22), a12)
    eigenvalues = (mean + radius, mean - radius)
    # Eigenvector of the largest eigenvalue at angle θ, tan 2θ = 2 a12 / (a11 − a22).
    angle = 0.5 * math.atan2(2.0 * a12, a11 - a22)
    cos, sin = math.cos(angle), math.sin(angle)
    vectors = ((cos, sin), (-sin, cos))
    threshold = rtol * max(abs(e) for e in eigenvalues)
    x1 = x2 = 0.0
    for value, (v1, v2) in zip(eigenvalues, vectors, strict=True):
        if value > threshold and value > 0.0:
            coefficient = (v1 * b1 + v2 * b2) / value
            x1 += coefficient * v1
            x2 += coefficient * v2
    return x1 * s1, x2 * s2


def solve_step_sizes(
    a11: float,
    a12: float,
    a22: float,
    b1: float,
    b2: float,
    rho: float | None = None,
    beta: float | None = None,
    rtol: float = 1e-10,
) -> StepSizes:
    """Minimise the quadratic model over ``z' = ρ z − β Δz``.

    Args:
        a11, a12, a22, b1, b2: the coefficients defined in the module docstring.
        rho: a fixed momentum ρ, or ``None`` to choose it automatically.
        beta: a fixed step β, or ``None`` to choose it automatically.
        rtol: eigenvalues of the 2×2 matrix below ``rtol`` times the largest
            one are treated as zero (the system is solved in float64).

    Returns:
        The step sizes and the model's predicted change ``M(z')`` (≤ 0 when
        both are automatic and the curvature is positive semi-definite).
    """
    if rho is None and beta is None:
        beta_, minus_rho = _pseudo_solve(a11, a12, a22, b1, b2, rtol)
        rho_ = -minus_rho
    elif rho is None:
        beta_ = float(beta)
        # dM/dρ = b2 − β a12 + ρ a22 = 0
        rho_ = (beta_ * a12 - b2) / a22 if a22 > 0.0 else 0.0
    elif beta is None:
        rho_ = float(rho)
        # dM/dβ = −b1 − ρ a12 + β a11 = 0
        beta_ = (b1 + rho_ * a12) / a11 if a11 > 0.0 else 0.0
    else:
        rho_, beta_ = float(rho), float(beta)
    predicted = (
        rho_ * b2
        - beta_ * b1
        + 0.5 * (rho_ * rho_ * a22 - 2.0 * rho_ * beta_ * a12 + beta_ * beta_ * a11)
    )
    return StepSizes(rho=rho_, beta=beta_, predicted_change=predicted)
