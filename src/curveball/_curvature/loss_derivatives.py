"""Derivatives of the loss with respect to the predictions.

CurveBall needs, at the predictions ``y``, the loss ``L``, its gradient
``J_L = dL/dy`` and products with its Hessian ``H_L = d²L/dy²``. They are
computed by automatic differentiation of ``loss_fn`` with respect to ``y`` only,
which is cheap because ``y`` is small compared with the parameters, and works
for any scalar loss that is twice differentiable in ``y``. (Closed forms exist
for softmax cross-entropy and squared error, e.g. ``H_L v = 2 v / B`` for a
summed-then-batch-averaged squared error; with this small a ``y`` they save no
measurable time, so one general code path serves every loss.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class LossDerivatives:
    """``L``, ``J_L`` and ``v ↦ H_L v`` of ``loss_fn`` at the predictions ``y``.

    Args:
        loss_fn: maps predictions to a scalar loss tensor.
        predictions: the point ``y``; it is detached from any graph.

    Raises:
        TypeError: if ``loss_fn`` does not return a floating-point scalar tensor.
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], predictions: torch.Tensor):
        self.predictions = predictions.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(self.predictions)
            if not isinstance(loss, torch.Tensor):
                raise TypeError(
                    f"loss_fn must return a scalar torch.Tensor, got {type(loss).__name__}"
                )
            if loss.numel() != 1 or not loss.is_floating_point():
                raise TypeError(
                    "loss_fn must return a floating-point scalar tensor (one element), "
                    f"got shape {tuple(loss.shape)} and dtype {loss.dtype}"
                )
            loss = loss.reshape(())
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss, self.predictions, create_graph=True)
            else:  # the loss does not depend on the predictions
                grad = torch.zeros_like(self.predictions)
        self.loss = loss.detach()
        self.grad = grad  # J_L, still attached to the loss graph for H_L products
        self._linear = not grad.requires_grad

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        """``H_L v`` for a tangent ``v`` shaped like the predictions."""
        if self._linear:
            return torch.zeros_like(vector)
        (out,) = torch.autograd.grad(
            self.grad, self.predictions, vector, retain_graph=True, allow_unused=True
        )
        return torch.zeros_like(vector) if out is None else out

    def release(self) -> None:
        """Free the loss graph."""
        self.grad = self.grad.detach()
        self._linear = True
