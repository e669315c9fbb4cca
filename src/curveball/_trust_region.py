"""The trust-region test of a step: the loss after the update against the model's prediction.

Every ``T`` steps the loss is evaluated on the step's own batch at the updated
parameters (Henriques et al., ICCV 2019, section 3.3) and the trust ratio

    r = (L(w_new) − L(w_old)) / M(z')

adapts λ by the rule of :mod:`curveball._damping`. With ``reject_uphill`` a test
that finds the loss risen (by more than :data:`ROUNDING_UNITS` units of the
loss's precision) rejects the step (:mod:`curveball._rollback`) and doubles λ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from curveball import _damping
from curveball._curvature.engine import JacobianEngine
from curveball._distributed import Averager
from curveball._products import phase
from curveball._rollback import Rollback, reject
from curveball._state import CurveBallState
from curveball._step_info import StepInfo

ROUNDING_UNITS = 16
"""A trial loss above the loss before the step by at most this many units of the loss's
precision (relative) counts as unchanged, not risen, for ``reject_uphill``; a test whose
predicted and measured changes are both that small leaves λ as it is."""


def rounding(loss: float, dtype: torch.dtype) -> float:
    """How far two evaluations of a loss near ``loss`` may differ by rounding alone:
    :data:`ROUNDING_UNITS` units of its precision."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return ROUNDING_UNITS * eps * abs(loss)


def rose(before: float, after: float, dtype: torch.dtype) -> bool:
    """Whether the loss rose by more than rounding: two evaluations of a loss at nearly
    the same point (a converged run) can differ by a few units of its precision either
    way, and a rise that small must not reject the step."""
    return after - before > rounding(before, dtype)


def trial_loss(
    engine: JacobianEngine,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    averager: Averager,
) -> tuple[float, torch.dtype]:
    """The loss on the step's batch at the current parameters (averaged over processes),
    and its dtype: one evaluation without a parameter graph, one host transfer."""
    trial = loss_fn(engine.evaluate()).detach()
    vector = trial.reshape(1).to(torch.float64)
    averager.mean_([vector])
    return vector.item(), trial.dtype


@dataclass(frozen=True)
class Verdict:
    """The outcome of a trust-region test."""

    ratio: float | None  # None: the test could not tell (see _damping.trust_ratio)
    lambd: float  # the damping after the test
    rejected: bool  # the loss rose and reject_uphill is on


def judge(info: StepInfo, trial: float, dtype: torch.dtype, hyper: dict[str, Any]) -> Verdict:
    """The trust ratio of the step that ``info`` describes, given its trial loss, and the
    damping that follows (doubled after a rejection)."""
    ratio = _damping.trust_ratio(
        trial - info.loss, info.predicted_change, rounding(info.loss, dtype)
    )
    omega = _damping.omega(hyper["lambda_factor"], hyper["lambda_interval"])
    lambd = _damping.adjust_damping(
        info.lambd, ratio, hyper["lambda_thresholds"], omega, hyper["lambda_min"]
    )
    rejected = hyper["reject_uphill"] and rose(info.loss, trial, dtype)
    if rejected:
        lambd = _damping.after_rejection(lambd)
    return Verdict(ratio, lambd, rejected)


HALVINGS = 20
"""The most times a line search halves the step (to 2⁻²⁰ of it)."""


def backtrack(
    before: float, rollback: Rollback, trial: Callable[[], tuple[float, torch.dtype]]
) -> float | None:
    """Halve the step (``w`` towards the kept point, ``z`` with it) until the trial loss is
    finite and not above ``before`` (beyond rounding); the step's length, or ``None``
    with the step at 2⁻²⁰ of its length if no halving descends."""
    length = 1.0
    for _ in range(HALVINGS):
        rollback.shrink(0.5)
        length *= 0.5
        value, dtype = trial()
        if math.isfinite(value) and not rose(before, value, dtype):
            return length
    return None


def trial_update(
    info: StepInfo,
    state: CurveBallState,
    hyper: dict[str, Any],
    rollback: Rollback,
    update: Callable[[], None],
    trial: Callable[[], tuple[float, torch.dtype]],
) -> tuple[StepInfo, str]:
    """Make the update, measure the trial loss, adapt λ in ``state``; undo what must not stand.

    Returns the step's record and a warning: ``""`` (none), ``"non-finite"`` (the trial
    loss was not finite: ``z``, ``w`` and the automatic ρ, β are back, and the caller
    skips the step) or the message of a rejection (``w`` and the buffers back, ``z``
    restarted). With ``line_search``, a step whose loss rose or is not finite is first
    halved until it descends (:func:`backtrack`, as the line search of ENGD; Müller &
    Zeinhofer, ICML 2023): that shorter step stands and λ grows as after a failed test.
    """
    sizes = state.sizes
    rollback.keep_point()
    with phase(5):
        update()
    with phase(6):
        value, dtype = trial()
    verdict = judge(info, value, dtype, hyper) if math.isfinite(value) else None
    if hyper.get("line_search") and (verdict is None or verdict.rejected):
        length = backtrack(info.loss, rollback, trial)
        if length is not None:  # a shorter step descends: it stands, and λ grows
            omega = _damping.omega(hyper["lambda_factor"], hyper["lambda_interval"])
            state.lambd = _damping.raise_damping(info.lambd, omega)
            ratio = None if verdict is None else verdict.ratio
            return replace(info, trust_ratio=ratio, next_lambd=state.lambd, step_length=length), ""
    if verdict is None:
        rollback.point()
        if sizes is not None:
            state.rho, state.beta = sizes
        return info, "non-finite"
    state.lambd = verdict.lambd
    info = replace(info, trust_ratio=verdict.ratio, next_lambd=verdict.lambd)
    if not verdict.rejected:
        return info, ""
    rollback.weights_and_restart()
    rollback.buffers()
    return reject(info, value, state)
