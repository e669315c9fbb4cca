"""Jacobian products by the "double backward" trick (fallback only).

With ``g(u) = Jᵀ u`` computed by a backward pass that keeps its own graph,
``J t = d/du ⟨g(u), t⟩`` is a second backward pass, through the first one.
One forward pass and one backward pass that keeps its graph serve every
product of an iteration, but each product then traverses that second-order
graph, which costs more than a forward-mode pass (and the lean rules of
:mod:`curveball._curvature.lean_rules` do not apply). It serves models with
operations that have no forward-mode formula, and optimizers built from bare
parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from curveball._curvature.engine import (
    DoubleBackwardUnsupported,
    JacobianEngine,
    ModelFn,
    check_predictions,
    independent_predictions,
    owned_like,
)
from curveball._curvature.input_derivatives import InputDerivativeWatch

_UNSUPPORTED = (
    "CurveBall cannot compute Jacobian products through this model: it has no forward-mode "
    "derivative and its backward pass cannot be differentiated again ({}). This is the case "
    "for torch.compile'd modules; run CurveBall on the uncompiled module."
)


class DoubleBackwardEngine(JacobianEngine):
    """:class:`~curveball._curvature.engine.JacobianEngine` from reverse mode only.

    Errors raised by ``model_fn`` itself propagate unchanged; an error raised
    while differentiating the backward pass becomes
    :class:`~curveball._curvature.engine.DoubleBackwardUnsupported`.
    """

    def __init__(self, params, tensors=None, traits=None) -> None:
        super().__init__(params, tensors, traits)
        self._predictions: torch.Tensor | None = None
        self._dummy: torch.Tensor | None = None
        self._backward: list[torch.Tensor] = []  # Jᵀ dummy, per used parameter
        self._used: list[int] = []

    def linearize(
        self, model_fn: ModelFn, tangents: Sequence[torch.Tensor], *, jvp_follows: bool = True
    ):
        self._model_fn = model_fn
        self.current_pass = "the first pass (y, J z)"
        self._record_rng(before=True)
        with torch.enable_grad():
            with InputDerivativeWatch(self.traits):
                y = check_predictions(model_fn())
            self._record_rng(before=False)
            if not y.requires_grad:
                raise independent_predictions()
            self._predictions = y
            self._dummy = torch.zeros_like(y, requires_grad=True)
            try:
                grads = torch.autograd.grad(
                    y, self.params, self._dummy, create_graph=True, allow_unused=True
                )
            except RuntimeError as error:
                raise DoubleBackwardUnsupported(_UNSUPPORTED.format(_first_line(error))) from error
            if all(g is None for g in grads):  # y requires grad through its inputs only
                raise independent_predictions()
            self._used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            self._backward = [grads[i] for i in self._used]
            return y, self.jvp(tangents)  # the first product differentiates the backward

    def vjp(self, cotangent: torch.Tensor, keep_graph: bool = False) -> list[torch.Tensor]:
        assert self._predictions is not None
        grads = torch.autograd.grad(
            self._predictions, self.params, cotangent, retain_graph=True, allow_unused=True
        )
        return owned_like(grads, self.params)

    def jvp(self, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
        assert self._predictions is not None
        if not self._used:
            return torch.zeros_like(self._predictions.detach())
        try:
            (out,) = torch.autograd.grad(
                self._backward,
                self._dummy,
                [tangents[i] for i in self._used],
                retain_graph=True,
                allow_unused=True,
            )
        except RuntimeError as error:
            raise DoubleBackwardUnsupported(_UNSUPPORTED.format(_first_line(error))) from error
        return torch.zeros_like(self._predictions.detach()) if out is None else out.detach()

    def finish(self) -> None:
        self._predictions = self._dummy = None
        self._backward = []
        super().finish()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
