"""The quadratic model of one step: the 2×2 system for ρ and β, its solution and M(z').

With ``z' = ρ z − β Δz`` the damped quadratic model

    M(z') = gᵀ z' + ½ z'ᵀ (G + λI) z'

restricted to the plane spanned by ``z`` and ``Δz`` is a quadratic in (β, ρ).
Its minimiser solves (Henriques et al., ICCV 2019, eq. 11)

    [[a11, a12], [a12, a22]] · [β, −ρ]ᵀ = [b1, b2]ᵀ

with ``a11 = Δzᵀ(G + λI)Δz``, ``a12 = zᵀ(G + λI)Δz``, ``a22 = zᵀ(G + λI)z``,
``b1 = gᵀΔz`` and ``b2 = gᵀz``. (When ``G``'s terms are estimated on a curvature
mini-batch, ``b1`` comes from the exact identity ``gᵀΔz = rᵀΔz − zᵀ(G + λI)Δz``
with ``r = (G + λI) z + g`` the model's gradient at ``z`` (the step's ``Δz`` before
preconditioning): the estimate then enters the model only through
``a11``, ``a22`` and ``(1 − ρ) β a12``.) With weight decay κ (per parameter group) the
gradient gains ``κ w`` and the damping ``κ``. The system is singular whenever
``z`` and ``Δz`` are parallel, in particular at the first step where ``z = 0``;
the minimum-norm (pseudo-inverse) solution is then the minimiser over the line
that the plane degenerates to, and is always finite.

With a loss that is not convex in the predictions, the network-side part of the
system, ``N = [[(JΔz)ᵀH_L(JΔz), (Jz)ᵀH_L(JΔz)], [·, (Jz)ᵀH_L(Jz)]]``, can be
indefinite, and the model then has no minimiser on the plane.
:func:`convexified` replaces ``N`` by its positive part (an eigenvalue clamp of
the 2×2 matrix), so that with ``λ > 0`` the system is positive definite and the
step still descends along the true gradient; an indefinite ``N`` also proves
that ``H_L`` is not positive semi-definite.

:func:`decide` is the stage of a step built on this: from the step's scalars it
either solves for ρ and β (or reuses them) or names the reason why the step
cannot be taken (a non-finite value, no descent direction in the plane).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from curveball._curvature.loss_derivatives import MAX_CLAMPED_OUTPUTS
from curveball._loss_scale import MIN_SCALE
from curveball._plan import Plan
from curveball._step_info import StepInfo
from curveball._step_scalars import StepScalars


@dataclass(frozen=True)
class StepSizes:
    """The outcome of one solve: ``z' = rho * z - beta * dz`` and ``M(z')``."""

    rho: float
    beta: float
    predicted_change: float


INDEFINITE_RTOL = 1e-9
"""An eigenvalue of ``N`` below ``−INDEFINITE_RTOL`` times its largest magnitude is negative."""


def convexified(curvature: dict[str, float]) -> tuple[dict[str, float], bool]:
    """The network-side terms with ``N`` made positive semi-definite, and whether it was not."""
    a, b, c = curvature["jdz_h_jdz"], curvature["jz_h_jdz"], curvature["jz_h_jz"]
    mean, radius = 0.5 * (a + c), math.hypot(0.5 * (a - c), b)
    low, high = mean - radius, mean + radius
    if not low < -INDEFINITE_RTOL * max(abs(low), abs(high)):
        return curvature, False
    # N⁺ = high · u uᵀ with u the eigenvector of the largest eigenvalue (0 if that is negative)
    angle = 0.5 * math.atan2(2.0 * b, a - c)
    u1, u2 = math.cos(angle), math.sin(angle)
    keep = max(high, 0.0)
    out = dict(curvature)
    out.update(jdz_h_jdz=keep * u1 * u1, jz_h_jdz=keep * u1 * u2, jz_h_jz=keep * u2 * u2)
    return out, True


@dataclass(frozen=True)
class QuadraticModel:
    """The coefficients of ``M`` on the plane spanned by ``z`` and ``Δz``."""

    a11: float
    a12: float
    a22: float
    b1: float
    b2: float

    @staticmethod
    def assemble(
        scalars: StepScalars,
        lambd: float,
        weight_decays: Sequence[float],
        curvature: dict[str, float] | None = None,
    ) -> QuadraticModel:
        """Build the system from a step's inner products, λ and the groups' weight decays.

        ``curvature`` replaces the step's network-side terms (e.g. :func:`convexified`'s).
        """
        net, groups = curvature or scalars.curvature, scalars.groups
        assert net is not None

        def damped(term: str) -> float:  # Σ_groups (λ + κ) · (inner product)
            return sum((lambd + k) * v for k, v in zip(weight_decays, groups[term], strict=True))

        def decayed(term: str) -> float:  # Σ_groups κ · wᵀ(·): the κ w part of the gradient
            if term not in groups:
                return 0.0
            return sum(k * v for k, v in zip(weight_decays, groups[term], strict=True))

        a12 = net["jz_h_jdz"] + damped("z_dz")
        if "raw_z" in groups:  # conjugate directions: r = (G + λI) z + g, the plane at z
            return QuadraticModel(
                a11=net["jdz_h_jdz"] + damped("dz_dz"),
                a12=a12,
                a22=net["jz_h_jz"] + damped("z_z"),
                b1=sum(groups["raw_dz"]),
                b2=sum(groups["raw_z"]),
            )
        if "raw_dz" in groups:  # gᵀΔz = (the model's gradient at z)ᵀΔz − zᵀ(G + λI)Δz
            assert scalars.curvature is not None
            b1 = sum(groups["raw_dz"]) - scalars.curvature["jz_h_jdz"] - damped("z_dz")
        else:
            b1 = net["jl_jdz"] + decayed("w_dz")
        return QuadraticModel(
            a11=net["jdz_h_jdz"] + damped("dz_dz"),
            a12=a12,
            a22=net["jz_h_jz"] + damped("z_z"),
            b1=b1,
            b2=net["jl_jz"] + decayed("w_z"),
        )

    def is_finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.a11, self.a12, self.a22, self.b1, self.b2))

    def change(self, rho: float, beta: float) -> float:
        """``M(ρ z − β Δz)``, the model's predicted change of the loss."""
        return (
            rho * self.b2
            - beta * self.b1
            + 0.5 * (rho * rho * self.a22 - 2.0 * rho * beta * self.a12 + beta * beta * self.a11)
        )

    def solve(
        self, rho: float | None = None, beta: float | None = None, rtol: float = 1e-10
    ) -> StepSizes:
        """Minimise the model over ``z' = ρ z − β Δz``.

        Args:
            rho: a fixed momentum ρ, or ``None`` to choose it automatically.
            beta: a fixed step β, or ``None`` to choose it automatically.
            rtol: eigenvalues of the 2×2 matrix below ``rtol`` times the largest
                one are treated as zero (the system is solved in float64).

        Returns:
            The step sizes and the predicted change ``M(z')`` (≤ 0 when both are
            automatic and the curvature is positive semi-definite).
        """
        if rho is None and beta is None:
            beta_, minus_rho = _pseudo_solve(self, rtol)
            rho_ = -minus_rho
        elif rho is None:
            beta_ = float(beta)
            # dM/dρ = b2 − β a12 + ρ a22 = 0
            rho_ = (beta_ * self.a12 - self.b2) / self.a22 if self.a22 > 0.0 else 0.0
        elif beta is None:
            rho_ = float(rho)
            # dM/dβ = −b1 − ρ a12 + β a11 = 0
            beta_ = (self.b1 + rho_ * self.a12) / self.a11 if self.a11 > 0.0 else 0.0
        else:
            rho_, beta_ = float(rho), float(beta)
        return StepSizes(rho=rho_, beta=beta_, predicted_change=self.change(rho_, beta_))


def _pseudo_solve(m: QuadraticModel, rtol: float) -> tuple[float, float]:
    """Minimum-norm solution of the symmetric 2×2 system, dropping tiny or negative curvature.

    The system is first scaled to a unit diagonal (``z`` and ``Δz`` can differ in
    length by many orders of magnitude near convergence), so that the threshold
    ``rtol`` only discards genuinely collinear directions.
    """
    s1 = 1.0 / math.sqrt(m.a11) if m.a11 > 0.0 else 1.0
    s2 = 1.0 / math.sqrt(m.a22) if m.a22 > 0.0 else 1.0
    a11, a12, a22 = m.a11 * s1 * s1, m.a12 * s1 * s2, m.a22 * s2 * s2
    b1, b2 = m.b1 * s1, m.b2 * s2
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


NOT_CONVEX = (
    "CurveBall: the loss is not convex in the predictions (its Hessian H_L has negative "
    "curvature along this step's directions); this step uses the positive part of the "
    "2×2 model, and later steps the positive part of H_L per sample (for up to "
    f"{MAX_CLAMPED_OUTPUTS} predictions per sample; beyond that, each step's 2×2 model "
    "is made convex), which keeps the curvature positive semi-definite as the method "
    "requires"
)
"""The warning given once when :func:`convexified` finds the loss not convex."""


def _not_finite(scalars: StepScalars, plan: Plan) -> str | None:
    """Why the step's loss, predictions or ``Δz`` make it impossible, if they do."""
    if not math.isfinite(scalars.loss):
        return "non-finite loss"
    if not scalars.predictions_finite:
        return "non-finite predictions"
    if not all(math.isfinite(v) for v in scalars.groups["dz_dz"]):
        if plan.loss_scale is not None and plan.loss_scale > MIN_SCALE:
            return f"float16 overflow of the loss scale {plan.loss_scale:g}"
        return "non-finite Δz"
    return None


def decide(
    scalars: StepScalars,
    plan: Plan,
    hyper: dict[str, Any],
    last: tuple[float, float] | None,
    weight_decays: Sequence[float],
) -> tuple[StepInfo, bool]:
    """Solve for ρ and β (or reuse ``last``), unless the step cannot be taken.

    Returns the step's :class:`StepInfo` (``skipped`` with a ``reason`` when it
    cannot be taken) and whether the network-side system was indefinite (the loss
    is not convex in the predictions: the caller switches to the positive part of
    ``H_L``).
    """
    last = last or (0.0, 0.0)
    info = StepInfo(plan.step, scalars.loss, *last, plan.lambd, plan.lambd, 0.0, solver=plan.solver)
    reason = _not_finite(scalars, plan)
    if reason is not None:
        return replace(info, skipped=True, reason=reason), False
    if not plan.refresh:
        rho = hyper["momentum"] if hyper["momentum"] is not None else last[0]
        beta = hyper["beta"] if hyper["beta"] is not None else last[1]
        return replace(info, rho=rho, beta=beta, predicted_change=math.nan, refreshed=False), False
    non_finite = replace(info, skipped=True, reason="non-finite J Δz or 2×2 system")
    assert scalars.curvature is not None
    if not all(math.isfinite(v) for v in scalars.curvature.values()):
        return non_finite, False
    curvature, indefinite = convexified(scalars.curvature)
    model = QuadraticModel.assemble(scalars, plan.lambd, weight_decays, curvature)
    if not model.is_finite():
        return non_finite, indefinite
    sizes = model.solve(hyper["momentum"], hyper["beta"])
    if not all(math.isfinite(v) for v in (sizes.rho, sizes.beta, sizes.predicted_change)):
        return replace(info, skipped=True, reason="non-finite 2×2 solution"), indefinite
    info = replace(info, rho=sizes.rho, beta=sizes.beta, predicted_change=sizes.predicted_change)
    if sizes.rho == 0.0 and sizes.beta == 0.0 and (model.b1 != 0.0 or model.b2 != 0.0):
        reason = (
            "no move: the quadratic model has no descent direction in span{z, Δz} "
            "(no curvature and no damping along the gradient)"
        )
        return replace(info, skipped=True, reason=reason), indefinite
    return info, indefinite
