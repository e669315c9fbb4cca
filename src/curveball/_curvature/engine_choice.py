"""The one place that picks a Jacobian engine and falls back from forward mode.

``forward_mode="auto"`` runs the products of a step with true forward-mode AD.
When that fails with a ``RuntimeError`` or ``NotImplementedError`` — an
operation without a forward-mode formula, an out= function under dual tensors,
a non-reentrant activation checkpoint whose recomputation rejects dual tensors,
whatever the wording — the step is undone (buffers and random generators) and
attempted once more with the double-backward engine:

* if that succeeds, the failure belonged to forward mode: the step stands, one
  warning says so, and the following steps use double backward;
* if it fails inside the model or the loss (the same error without dual
  tensors), the error is the user's: it is raised as is, without a warning;
* if the model's backward pass cannot be differentiated either (e.g. a
  ``torch.compile``'d module), :class:`DoubleBackwardUnsupported` is raised and
  forward mode stays selected.

A model function that differentiates the network with respect to its inputs is
recognised by the first forward-mode pass that meets ``torch.autograd.grad``
(:mod:`~curveball._curvature.input_derivatives`): the step is undone and computed
again in forward mode without the lean rules, which the following steps keep.
That is not a fallback and gives no warning.

A model function that brings its Jacobian (:class:`curveball.pointwise.PointwiseResidual`)
gets neither: its products are matrix products with that Jacobian
(:mod:`~curveball._curvature.jacobian_matrix`), where it fits in memory.

``forward_mode="fastest"`` measures instead of assuming: the second step runs with
double backward, the fourth in forward mode (the first and third warm each up), and
the faster one serves from then on, double backward only if it took under
:data:`FASTER` of forward mode's time. (Double backward goes first because models with
input derivatives, where it tends to win, often form a dense preconditioner on the
first step: ``D`` products.) Models that differentiate themselves with
respect to their inputs are where this matters: PyTorch's forward-mode formulas for a
backward pass (forward-over-reverse) can cost several times the double-backward
products there (on a physics-informed network, a measured 4× per product).

A fallback caused by one unusual batch does not pin the optimizer to the slow
path: after a fallback, forward mode is tried again after ``retry`` steps, with
``retry`` = 10 at first and doubling (up to 1,000) each time forward mode fails
again; a success resets it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import TypeVar

import torch

from curveball._curvature.double_backward import DoubleBackwardEngine
from curveball._curvature.engine import DoubleBackwardUnsupported, JacobianEngine
from curveball._curvature.forward_mode import ForwardModeEngine
from curveball._curvature.input_derivatives import InputDerivativesSeen, ModelTraits
from curveball._curvature.jacobian_matrix import JacobianMatrixEngine
from curveball._curvature.module_tensors import ModuleTensors

MODES = ("auto", "forward", "double-backward", "fastest")

FASTER = 0.8
"""``"fastest"`` keeps double backward only if its step took less than this times forward
mode's (forward mode is the default where the two are close)."""
FIRST_RETRY, MAX_RETRY = 10, 1000

T = TypeVar("T")


class EngineChoice:
    """The engine for each step, and the fallback rule of the module docstring.

    Args:
        params: the trainable parameters.
        tensors: where they live in the module, or ``None`` (bare parameters:
            double backward only).
        mode: ``"auto"``, ``"forward"`` (never fall back), ``"double-backward"`` or
            ``"fastest"``.
        on_fallback: called with a message when a step fell back.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        tensors: ModuleTensors | None,
        mode: str = "auto",
        on_fallback: Callable[[str], None] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"forward_mode: expected one of {MODES}, got {mode!r}")
        self.mode = mode if tensors is not None else "double-backward"
        self.traits = ModelTraits()
        self._forward = (
            ForwardModeEngine(params, tensors, self.traits) if tensors is not None else None
        )
        self._double = DoubleBackwardEngine(params, tensors, self.traits)
        self._matrix = JacobianMatrixEngine(params)
        self._on_fallback = on_fallback
        self._wait = 0  # steps left on double backward before forward mode is tried again
        self._retry = FIRST_RETRY
        self.engine: JacobianEngine = (
            self._double
            if self.mode == "double-backward"
            else (
                self._forward  # type: ignore[assignment]
            )
        )
        self.fell_back = False  # whether the last run fell back
        self._trials = 0  # calls of run() measured by the "fastest" mode
        self._double_seconds = math.inf

    def run(
        self,
        attempt: Callable[[JacobianEngine], T],
        undo: Callable[[], None],
        matrix: bool = False,
    ) -> T:
        """``attempt(engine)`` with the chosen engine, falling back as documented.

        ``undo`` puts the module's buffers back after a failed attempt (the
        random generators are rewound here). ``matrix``: the model function brings its
        Jacobian, and the products come from it (no choice, no fallback).
        """
        if matrix:
            return self._attempt(self._matrix, attempt)
        for _ in range(len(fields(ModelTraits))):
            try:
                return self._run(attempt, undo)
            except InputDerivativesSeen:  # a trait is now known: the same engines, adapted
                undo()
        return self._run(attempt, undo)

    def _fastest(self, attempt: Callable[[JacobianEngine], T], undo: Callable[[], None]) -> T:
        """One of the measured calls of ``"fastest"`` (see the module docstring)."""
        call, start = self._trials, time.perf_counter()
        self._trials += 1
        if self._forward is None:
            self.mode = "double-backward"
            return self._run(attempt, undo)
        if call < 2:
            try:
                result = self._attempt(self._double, attempt)
            except DoubleBackwardUnsupported:
                undo()
                self.mode = "auto"
                return self._run(attempt, undo)
            if call == 1:
                self._double_seconds = time.perf_counter() - start
            return result
        self.mode = "auto"
        try:
            result = self._run(attempt, undo)
        except InputDerivativesSeen:  # run() repeats this call: it is not a measurement
            self.mode, self._trials = "fastest", call
            raise
        if self.fell_back:  # forward mode failed: auto's fallback rule from now on
            return result
        self.mode = "fastest"
        if call == 3:
            faster = self._double_seconds < FASTER * (time.perf_counter() - start)
            self.mode = "double-backward" if faster else "auto"
        return result

    def _run(self, attempt: Callable[[JacobianEngine], T], undo: Callable[[], None]) -> T:
        if self.mode == "fastest":
            return self._fastest(attempt, undo)
        self.fell_back = False
        if self.mode != "auto":
            chosen = self._double if self.mode == "double-backward" else self._forward
            return self._attempt(chosen, attempt)
        if self._wait > 0:
            self._wait -= 1
            return self._attempt(self._double, attempt)
        assert self._forward is not None
        try:
            result = self._attempt(self._forward, attempt)
        except (RuntimeError, NotImplementedError) as error:
            forward_error, failed_pass = error, self._forward.current_pass
        else:
            self._retry = FIRST_RETRY
            return result
        undo()
        try:
            result = self._attempt(self._double, attempt)
        except DoubleBackwardUnsupported as error:
            self.engine = self._forward
            raise error from forward_error
        self._wait, self._retry = self._retry, min(2 * self._retry, MAX_RETRY)
        self.fell_back = True
        if self._on_fallback is not None:
            first = str(forward_error).strip().splitlines()
            reason = first[0] if first else type(forward_error).__name__
            self._on_fallback(
                f"CurveBall: forward-mode AD failed in {failed_pass} of this model "
                f"({type(forward_error).__name__}: {reason}); the step was computed with the "
                f"slower double-backward products, which the next {self._wait} steps use too "
                "before forward mode is tried again"
            )
        return result

    def _attempt(self, engine: JacobianEngine, attempt: Callable[[JacobianEngine], T]) -> T:
        self.engine = engine
        try:
            return attempt(engine)
        except BaseException:
            engine.abort()
            raise
