"""The damping rule: how λ adapts (trust region, Levenberg-Marquardt style).

Every ``T`` steps the loss is evaluated at the new parameters on the same batch
and compared with the change that the quadratic model predicted:

    r = (L(w_new) − L(w_old)) / M(z')

If the model was too optimistic (``r`` below the lower threshold) the damping
grows, ``λ ← λ / ω``; if the loss fell by more than predicted (``r`` above the
upper threshold) it shrinks, ``λ ← λ ω``; with ``ω = factor ** T``
(Henriques et al., ICCV 2019, section 3.3; Martens 2010). A step that had to be
skipped (a non-finite value) counts as a failed test; a test whose predicted
and measured changes are both within the loss's rounding (a converged run) counts
as none. A multiplicative rule never leaves ``λ = 0``, so growth from zero starts
at :data:`LAMBDA_FLOOR`.
With ``reject_uphill`` (a default, not the paper's), a test that finds the loss
risen (``r < 0``) also rejects the step, and λ doubles (:func:`after_rejection`).
``lambda_min`` is a floor that the shrinking stops at.

The defaults (:data:`DEFAULT_INTERVAL`, :data:`DEFAULT_FACTOR`,
:data:`DEFAULT_THRESHOLDS`, :data:`DEFAULT_MINIMUM`) are the Levenberg-Marquardt rule
of Hessian-free optimisation (Martens, ICML 2010, section 4.1): every 5 steps λ × 2/3 when
``r > 3/4`` and λ × 3/2 when ``r < 1/4``, with λ kept at 0.05 or above. The
paper's rule (factor 0.999 per step, thresholds 0.5 and 1.5, no floor) moves λ
by 0.5 % per test, so λ hardly leaves its initial value.
"""

from __future__ import annotations

import math

LAMBDA_FLOOR = 1e-8
"""The damping that a failed test gives when λ was 0."""

DEFAULT_INTERVAL = 5
"""The default number of steps between trust-region tests (the paper's)."""

DEFAULT_FACTOR = (2.0 / 3.0) ** (1.0 / DEFAULT_INTERVAL)
"""The default per-step factor: ω = 2/3 per test at the default interval."""

DEFAULT_THRESHOLDS = (0.25, 0.75)
"""The default ``(low, high)`` trust-ratio thresholds."""

DEFAULT_MINIMUM = 0.05
"""The default floor of λ under the rule's shrinking."""

REJECTION_FACTOR = 2.0
"""How much λ grows when a tested step raised the loss and was rejected (``reject_uphill``)."""


def omega(factor: float, interval: int) -> float:
    """``ω = factor ** T``: the change of λ per trust-region test."""
    return factor**interval


def trust_ratio(
    actual_change: float, predicted_change: float, resolution: float = 0.0
) -> float | None:
    """``actual / predicted``, or ``None`` when the test cannot tell.

    It cannot when the model predicted no change at all, or when both changes are
    within ``resolution`` (the rounding of the loss's evaluations): near a minimum
    the model predicts changes far below it, the measured change is rounding noise
    of either sign, and their ratio says nothing about the model.
    """
    if predicted_change == 0.0:
        return None
    if abs(predicted_change) <= resolution and abs(actual_change) <= resolution:
        return None
    return actual_change / predicted_change


def raise_damping(lambd: float, omega: float) -> float:
    """``λ / ω``, starting from :data:`LAMBDA_FLOOR` when λ is 0 (``ω = 1`` keeps λ)."""
    if omega >= 1.0:
        return lambd
    return max(lambd / omega, LAMBDA_FLOOR)


def adjust_damping(
    lambd: float,
    ratio: float | None,
    thresholds: tuple[float, float] = DEFAULT_THRESHOLDS,
    omega: float = DEFAULT_FACTOR**DEFAULT_INTERVAL,
    minimum: float = DEFAULT_MINIMUM,
) -> float:
    """The new damping after a trust-ratio test.

    Args:
        lambd: the current damping λ.
        ratio: the trust ratio ``r`` (``None``: nothing was predicted, λ is kept;
            a non-finite ratio counts as a failed test).
        thresholds: ``(low, high)``: λ grows below ``low`` and shrinks above ``high``.
        omega: the factor ``ω ∈ (0, 1]``.
        minimum: λ does not shrink below this (it is not raised to it either).
    """
    low, high = thresholds
    if ratio is None:
        return lambd
    if not math.isfinite(ratio) or ratio < low:
        return raise_damping(lambd, omega)
    if ratio > high:
        return max(lambd * omega, min(minimum, lambd))
    return lambd


def after_rejection(lambd: float) -> float:
    """The damping after a rejected step: :data:`REJECTION_FACTOR` λ, at least
    :data:`LAMBDA_FLOOR`.

    The rule of :func:`adjust_damping` changes λ by ``1/ω`` at most (0.5 % per test
    with the paper's factor, 50 % with the default), so alone it could propose nearly
    the same step again on the next attempt; a trust-region method must shrink the
    region after a rejection.
    """
    return max(REJECTION_FACTOR * lambd, LAMBDA_FLOOR)
