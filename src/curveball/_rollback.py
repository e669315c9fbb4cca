"""The fault rollback: what a step that cannot stand goes back to, and what it changes.

A step is *skipped* when a value it needs is not finite (the loss, the
predictions, ``Δz``, the 2×2 system, the loss after a trial update) or the
quadratic model gives no direction to move in: the parameters and ``z`` stay
where they were, the module's buffers (batch-norm running statistics) are put
back, and λ grows by ``1/ω`` (a failed trust-region test); an overflow of the
float16 loss scale halves the scale instead (:mod:`curveball._loss_scale`).
A step is *rejected* when its trust-region test finds the loss risen
(``reject_uphill``): the parameters and buffers go back, ``z`` restarts from
zero and the next step solves for ρ and β anew (λ was doubled by the test).
Nothing non-finite ever reaches the parameters, ``z`` or the optimizer state.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from curveball import _damping
from curveball._layout import Layout, keeps_buffers
from curveball._loss_scale import after_overflow
from curveball._state import CurveBallState
from curveball._step_info import StepInfo
from curveball._undo import BufferSnapshot


class Rollback:
    """What a step can go back to: the module's buffers, and ``z`` and ``w`` around a trial.

    Args:
        layout: the step's layout (its ``tensors`` name the buffers; ``kept`` holds the
            copies of ``z`` and ``w``, kept between steps on a CPU).
    """

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        tensors = layout.tensors
        self._buffers = None
        if tensors is not None and tensors.buffer_slots:
            self._buffers = BufferSnapshot(tensors.current_buffers)
        self._point: list[torch.Tensor] | None = None

    @property
    def engine(self):
        """The engine of the step (the one that evaluates the trial loss)."""
        return self._layout.engines.engine

    def buffers(self) -> None:
        """Put the module's buffers back as they were before the step."""
        if self._buffers is not None:
            self._buffers.restore()

    def keep_point(self) -> None:
        """Copy ``z`` and ``w`` before a trial update."""
        layout = self._layout
        assert layout.zs is not None
        current = [t.detach() for t in (*layout.zs, *layout.params)]
        if keeps_buffers(layout.params):
            if layout.kept is None:
                layout.kept = [torch.empty_like(t) for t in current]  # same strides as t
            torch._foreach_copy_(layout.kept, current)
            self._point = layout.kept
        else:
            self._point = [t.clone() for t in current]

    @torch.no_grad()
    def point(self) -> None:
        """``z`` and ``w`` back to the kept copies (after a non-finite trial)."""
        layout, kept = self._layout, self._point
        assert layout.zs is not None and kept is not None
        torch._foreach_copy_([*layout.zs, *layout.params], kept)

    @torch.no_grad()
    def shrink(self, factor: float) -> None:
        """Shorten the trial update: ``w ← w₀ + factor (w − w₀)`` and ``z ← factor z``."""
        layout, kept = self._layout, self._point
        assert layout.zs is not None and kept is not None
        start = kept[len(layout.zs) :]
        torch._foreach_sub_(layout.params, start)
        torch._foreach_mul_(layout.params, factor)
        torch._foreach_add_(layout.params, start)
        torch._foreach_mul_(layout.zs, factor)

    @torch.no_grad()
    def weights_and_restart(self) -> None:
        """``w`` back to the kept copy and ``z`` restarted from zero (a rejected step)."""
        layout, kept = self._layout, self._point
        assert layout.zs is not None and kept is not None
        torch._foreach_copy_(layout.params, kept[len(layout.zs) :])
        torch._foreach_zero_(layout.zs)


def skip(info: StepInfo, state: CurveBallState, hyper: dict[str, Any]) -> tuple[StepInfo, str]:
    """The record of a skipped step, with ``state`` updated (λ raised, or the float16 scale
    halved), and the warning that says so (empty for a scale overflow)."""
    if info.reason is not None and info.reason.startswith("float16 overflow"):
        state.loss_scale, state.scaled_steps = after_overflow(state.loss_scale), 0
        return replace(info, skipped=True, next_lambd=info.lambd), ""
    if info.solver == "exact":  # its damping is fixed
        message = (
            f"CurveBall step {info.step} skipped: {info.reason}; parameters and z are "
            "unchanged (solver='exact': the damping stays fixed)"
        )
        return replace(info, skipped=True, next_lambd=state.lambd), message
    omega = _damping.omega(hyper["lambda_factor"], hyper["lambda_interval"])
    lambd = state.lambd = _damping.raise_damping(info.lambd, omega)
    message = (
        f"CurveBall step {info.step} skipped: {info.reason}; parameters and z are "
        f"unchanged, damping raised to λ={lambd:.4g}"
    )
    return replace(info, skipped=True, next_lambd=lambd), message


def reject(info: StepInfo, trial_loss: float, state: CurveBallState) -> tuple[StepInfo, str]:
    """The record of a rejected step, with ``state`` told to solve for ρ and β anew, and its
    warning."""
    state.rho = state.beta = None  # the next step solves for them anew
    if info.solver == "exact":
        message = (
            f"CurveBall step {info.step} rejected: the loss on its batch rose from "
            f"{info.loss:.6g} to {trial_loss:.6g} even on the line search's shortest step; the "
            "parameters and buffers are back where they were (solver='exact': the Gauss-Newton "
            "step of the next batch is tried; on a fixed batch, the same step fails again, so "
            "use solver='conjugate')"
        )
        return replace(
            info, skipped=True, reason="rejected: the loss rose on the step's batch"
        ), message
    message = (
        f"CurveBall step {info.step} rejected: the loss on its batch rose from "
        f"{info.loss:.6g} to {trial_loss:.6g} where the quadratic model predicted a fall "
        f"of {-info.predicted_change:.3g}; the parameters and buffers are back where they "
        f"were, z restarts from zero and λ doubles to {state.lambd:.4g}. Frequent "
        "rejections mean that λ starts too small for this model: raise lambd"
    )
    return replace(
        info, skipped=True, reason="rejected: the loss rose on the step's batch"
    ), message
