"""Jacobian products by the "double backward" trick (fallback only).

With ``g(u) = Jᵀ u`` computed by a backward pass that keeps its own graph,
``J t = d/du ⟨g(u), t⟩`` is a second backward pass, through the first one.
One forward pass and one backward pass that keeps its graph serve every
product of an iteration, but each product then traverses that second-order
graph, which costs more than a forward-mode pass (and the lean rules of
:mod:`curveball.curvature.tangent_rules` do not apply). It serves models with
operations that have no forward-mode formula, and optimizers built from bare
parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from curveball.curvature.engine import JacobianEngine, ModelFn, check_predictions, owned_like


class DoubleBackwardUnsupported(RuntimeError):
    """Raised when the model's backward pass cannot itself be differentiated."""


_COMPILED_HINT = (
    "CurveBall cannot compute Jacobian products through this model: it has no forward-mode "
    "derivative and its backward pass cannot be differentiated again ({}). This is the case "
    "for torch.compile'd modules; run CurveBall on the uncompiled module."
)


class DoubleBackwardEngine(JacobianEngine):
    """:class:`~curveball.curvature.engine.JacobianEngine` from reverse mode only."""

    def __init__(self, params, tensors=None) -> None:
        super().__init__(params, tensors)
        self._predictions: torch.Tensor | None = None
        self._dummy: torch.Tensor | None = None
        self._backward: list[torch.Tensor] = []  # Jᵀ dummy, per used parameter
        self._used: list[int] = []

    def linearize(
        self, model_fn: ModelFn, tangents: Sequence[torch.Tensor], *, jvp_follows: bool = True
    ):
        self._model_fn = model_fn
        self._record_rng(before=True)
        with torch.enable_grad():
            y = check_predictions(model_fn())
            self._record_rng(before=False)
            self._predictions = y
            self._used = []
            self._backward = []
            try:
                if y.requires_grad:
                    self._dummy = torch.zeros_like(y, requires_grad=True)
                    grads = torch.autograd.grad(
                        y, self.params, self._dummy, create_graph=True, allow_unused=True
                    )
                    for i, g in enumerate(grads):
                        if g is not None and g.requires_grad:
                            self._used.append(i)
                            self._backward.append(g)
                return y, self.jvp(tangents)  # the first product differentiates the backward
            except RuntimeError as error:
                text = str(error)
                if "double backward" in text or "create_graph" in text:
                    first = text.strip().splitlines()[0]
                    raise DoubleBackwardUnsupported(_COMPILED_HINT.format(first)) from error
                raise

    def vjp(self, cotangent: torch.Tensor) -> list[torch.Tensor]:
        assert self._predictions is not None
        if not self._predictions.requires_grad:
            return owned_like([None] * len(self.params), self.params)
        grads = torch.autograd.grad(
            self._predictions, self.params, cotangent, retain_graph=True, allow_unused=True
        )
        return owned_like(grads, self.params)

    def jvp(self, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
        assert self._predictions is not None
        if not self._used:
            return torch.zeros_like(self._predictions.detach())
        (out,) = torch.autograd.grad(
            self._backward,
            self._dummy,
            [tangents[i] for i in self._used],
            retain_graph=True,
            allow_unused=True,
        )
        return torch.zeros_like(self._predictions.detach()) if out is None else out.detach()

    def finish(self) -> None:
        self._predictions = self._dummy = None
        self._backward = []
        super().finish()
