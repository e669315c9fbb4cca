"""What one step computes, decided before it runs: its number, λ, and which stages run.

A step always forms ``Δz``; it solves the 2×2 system for ρ and β (and so runs the
second forward-mode pass) when it refreshes them, and it evaluates the loss
after the update when it tests the trust region (every ``T`` steps). Between
refreshes (``step_size_interval``) the last automatic ρ and β are reused, but
only while :func:`reusable` allows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from curveball import _hyperparameters as hyperparameters
from curveball._loss_scale import float16_in_use
from curveball._state import CurveBallState


@dataclass(frozen=True)
class Plan:
    """What one step computes: its number, λ, whether it solves for ρ, β and tests λ."""

    step: int
    lambd: float
    refresh: bool
    trial: bool
    loss_scale: float | None  # the float16 scale of the backward pass, if active
    precondition: tuple[float, float] | None  # (decay, eps) of the diagonal preconditioner
    curvature_fraction: float  # of the batch for J d (1: the whole batch)
    inner_steps: int = 1  # iterations on the step's quadratic model (see _inner_loop)
    inverse: str | None = None  # "gauss-newton" or "nystrom": precondition with ≈ (G + λI)⁻¹
    new_inverse: bool = False  # form G (or its sketch) afresh at this step
    rank: int = 64  # the Nyström sketch's number of products
    solver: str = (
        "curveball"  # "curveball" (span{z, d}), "conjugate" (span{z − z_prev, d}), "exact"
    )

    @property
    def minibatch(self) -> bool:
        return self.curvature_fraction < 1.0


def reusable(sizes: tuple[float, float] | None, hyper: dict[str, Any]) -> bool:
    """Whether the last automatic ρ and β may be reused on a step that does not solve.

    Only a contraction (0 ≤ ρ ≤ 1) along the descent direction (β ≥ 0) is: the exact
    minimiser over one step's plane can be any pair (a negative or large ρ, a negative
    β), which, repeated on later steps' planes, can make z grow geometrically (a ρ of
    −1.6 reused did, on an MLP, until the loss overflowed). Other pairs are solved for anew.
    """
    if sizes is None:
        return False
    rho, beta = sizes
    return (hyper["momentum"] is not None or 0.0 <= rho <= 1.0) and (
        hyper["beta"] is not None or beta >= 0.0
    )


def parameter_count(params: list[torch.Tensor]) -> int:
    """The number of real numbers in ``params`` (two per complex entry)."""
    return sum(2 * p.numel() if p.is_complex() else p.numel() for p in params)


def plan(
    state: CurveBallState,
    hyper: dict[str, Any],
    params: list[torch.Tensor],
    jacobian_given: bool = False,
    matrix: bool = False,
) -> Plan:
    """The plan of the step after ``state.step`` steps, with the global hyper-parameters
    (``jacobian_given``: the model function brings its Jacobian, which ``solver="auto"``
    takes as the sign that the exact solve is cheap; ``matrix``: the step's products come
    from that Jacobian held as a matrix, which ``"auto"`` in ``precondition_interval`` and
    ``precondition_rank`` takes as the sign that forming ``G`` or its sketch is cheap, see
    :data:`~curveball._hyperparameters.AUTO_SCHEDULE`).

    ``solver="exact"`` forms the dense Gauss-Newton matrix at every step and solves with
    the fixed damping :data:`~curveball._hyperparameters.EXACT_DAMPING`: one iteration with
    ``P = (G + λI)⁻¹`` at this point lands on the model's minimiser (ρ = β = 1), so no
    further iteration could improve it."""
    step = state.step + 1
    size = parameter_count(params)
    name = hyper.get("solver", "curveball")
    solver = hyperparameters.solver(name, size, hyper["precondition"], jacobian_given)
    auto_sizes = hyper["momentum"] is None or hyper["beta"] is None
    trial = hyper["auto_lambda"] and step % hyper["lambda_interval"] == 0
    due = (step - 1) % hyper["step_size_interval"] == 0
    refresh = trial or (auto_sizes and (due or not reusable(state.sizes, hyper)))
    kind = hyperparameters.preconditioner(hyper["precondition"], size)
    precondition = None
    if kind == "diagonal":
        precondition = (hyper["precondition_decay"], hyper["precondition_eps"])
    inverse = kind if kind in ("gauss-newton", "nystrom") else None
    interval, rank = hyperparameters.schedule(
        hyper.get("precondition_interval", 1), hyper.get("precondition_rank", 64), matrix
    )
    exact = solver == "exact"
    if exact:
        precondition, inverse, interval = None, "gauss-newton", 1
    return Plan(
        step=step,
        lambd=hyperparameters.EXACT_DAMPING if exact else state.lambd,
        refresh=refresh,
        trial=trial,
        loss_scale=state.loss_scale if float16_in_use(params) else None,
        precondition=precondition,
        curvature_fraction=hyper["curvature_fraction"],
        inner_steps=1 if exact else hyper.get("inner_steps", 1),
        solver=solver,
        inverse=inverse,
        new_inverse=inverse is not None and (step - 1) % interval == 0,
        rank=rank,
    )
