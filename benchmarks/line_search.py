"""Line searches for the PINN baselines: a grid search over step sizes (ENGD) and Armijo
backtracking (Hessian-free), on the loss along a direction.

Both take ``loss_at(η)``, the loss at θ + η d as a 0-dim tensor; :func:`loss_along` builds it
from a closure that evaluates the loss at the parameters in place (it writes θ₀ + η d into
them, like ``torch.optim.LBFGS``'s line search). The chosen step is left for the caller to
write (:func:`move`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

LossAt = Callable[[float], torch.Tensor]
"""The loss at step size η along a fixed direction, a 0-dim tensor."""


def step_size_grid(k_max: int = 30) -> tuple[float, ...]:
    """The grid {2⁻ᵏ : k = 0, …, k_max} (largest first), as in ENGD (Müller & Zeinhofer,
    ICML 2023, §4) and Dangel et al. (NeurIPS 2024)."""
    return tuple(2.0**-k for k in range(k_max + 1))


@torch.no_grad()
def move(
    params: Sequence[torch.Tensor],
    start: Sequence[torch.Tensor],
    direction: Sequence[torch.Tensor],
    step_size: float,
) -> None:
    """Write θ = θ₀ + η d into ``params`` in place (``start`` = θ₀ is left as it is)."""
    for p, p0, d in zip(params, start, direction, strict=True):
        p.copy_(p0).add_(d, alpha=step_size)


def loss_along(
    params: Sequence[torch.Tensor],
    direction: Sequence[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor],
) -> tuple[LossAt, Callable[[float], None]]:
    """``(loss_at, accept)`` along θ₀ + η d from the parameters' current values θ₀.

    ``loss_at(η)`` writes θ₀ + η d into ``params`` and returns ``loss_fn()`` there, detached;
    ``accept(η)`` leaves the parameters at θ₀ + η d (η = 0: back at θ₀)."""
    start = [p.detach().clone() for p in params]

    def loss_at(step_size: float) -> torch.Tensor:
        move(params, start, direction, step_size)
        return loss_fn().detach()

    def accept(step_size: float) -> None:
        move(params, start, direction, step_size)

    return loss_at, accept


def grid_line_search(
    loss_at: LossAt, grid: Sequence[float], current: torch.Tensor | float | None = None
) -> tuple[float, torch.Tensor]:
    """The step size of ``grid`` with the lowest loss: ``argmin_{η ∈ grid} L(θ + η d)``.

    Every step size is evaluated (one host synchronisation at the end); a non-finite loss
    counts as +∞. With ``current`` (the loss at η = 0) given, a grid whose best loss is not
    below it yields η = 0 (no move).

    Returns:
        ``(η, L(θ + η d))``.
    """
    losses = torch.stack([loss_at(eta) for eta in grid])
    finite = torch.nan_to_num(losses, nan=math.inf, posinf=math.inf)
    best = int(torch.argmin(finite))
    if current is not None and not bool(finite[best] < current):
        return 0.0, torch.as_tensor(current, dtype=losses.dtype, device=losses.device)
    return grid[best], losses[best]


def backtracking_line_search(
    loss_at: LossAt,
    current: torch.Tensor | float,
    slope: torch.Tensor | float,
    initial: float = 1.0,
    shrink: float = 0.8,
    armijo: float = 1e-2,
    max_tries: int = 40,
) -> tuple[float, torch.Tensor]:
    """Armijo backtracking (Martens, ICML 2010, §4.6; Nocedal & Wright, Alg. 3.1).

    Tries η = initial · shrinkᵏ, k = 0, 1, …, and takes the first with
    ``L(θ + η d) ≤ L(θ) + armijo · η · slope`` (``slope`` = ∇Lᵀd < 0); η = 0 if none of
    ``max_tries`` does.

    Returns:
        ``(η, L(θ + η d))``, the loss at η = 0 being ``current``.
    """
    eta, loss = initial, torch.as_tensor(current)
    for _ in range(max_tries):
        loss = loss_at(eta)
        if bool(loss <= current + armijo * eta * slope):
            return eta, loss
        eta *= shrink
    return 0.0, torch.as_tensor(current, dtype=loss.dtype, device=loss.device)
