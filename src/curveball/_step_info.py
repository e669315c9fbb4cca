"""What one step did: :class:`StepInfo`, for logging and inspection."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class StepInfo:
    """What one :meth:`CurveBall.step` did (``optimizer.last``).

    Attributes:
        step: the step number (1 for the first step).
        loss: the loss at the parameters before the step.
        rho: the momentum ρ used for ``z ← ρ z − β Δz``.
        beta: the step β.
        lambd: the damping λ the step was computed with.
        next_lambd: the damping after the step's trust-region update.
        predicted_change: the quadratic model's predicted loss change ``M(z')``.
        trust_ratio: actual over predicted change, when it was measured (else ``None``:
            no test at this step, or both changes within the loss's rounding).
        refreshed: whether ρ and β were solved for at this step (else reused).
        skipped: whether the step left the parameters unchanged (and ``z``, except
            after a rejected step, which restarts it from zero).
        reason: why it was skipped (what was non-finite, why it could not move, or
            that the loss rose on its batch and it was rejected).
        engine: ``"forward"``, ``"double-backward"`` or ``"jacobian"`` (matrix products with
            the Jacobian a :class:`curveball.pointwise.PointwiseResidual` brings): how the
            products were computed.
        inner_steps: the iterations on the step's quadratic model that were taken
            (``inner_steps`` of the optimizer, fewer if one could not be taken).
        step_length: the fraction of the update that was taken (below 1 when the line
            search shortened it).
        solver: the solver of the step: ``"curveball"``, ``"conjugate"`` or ``"exact"``
            (what ``solver="auto"`` chose).
    """

    step: int
    loss: float
    rho: float
    beta: float
    lambd: float
    next_lambd: float
    predicted_change: float
    trust_ratio: float | None = None
    refreshed: bool = True
    skipped: bool = False
    reason: str | None = None
    engine: str = "forward"
    inner_steps: int = 1
    step_length: float = 1.0
    solver: str = "curveball"

    def as_dict(self) -> dict[str, float]:
        """The numbers as plain floats, for any tracker (``nan`` where nothing was measured).

        Booleans become 0.0 or 1.0; the text fields ``reason``, ``engine`` and ``solver`` are
        left out.
        """
        out = {}
        for name, value in asdict(self).items():
            if value is None:
                out[name] = math.nan
            elif isinstance(value, bool | int | float):
                out[name] = float(value)
        return out
