"""Generalised Gauss-Newton products ``G v = Jᵀ H_L J v``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from curveball._curvature.engine_choice import EngineChoice
from curveball._curvature.loss_derivatives import LossDerivatives
from curveball._curvature.module_tensors import ModuleTensors
from curveball._undo import BufferSnapshot


def ggn_vector_product(
    model_fn: Callable[[], torch.Tensor],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    params: Sequence[torch.Tensor],
    vector: Sequence[torch.Tensor],
    module: nn.Module | None = None,
    forward_mode: str = "auto",
) -> list[torch.Tensor]:
    """The product of the generalised Gauss-Newton matrix with ``vector``.

    ``G = Jᵀ H_L J`` with ``J`` the Jacobian of ``model_fn()`` with respect to
    ``params`` and ``H_L`` the Hessian of ``loss_fn`` at the predictions
    (Schraudolph 2002; Henriques et al., ICCV 2019, eq. 4). With ``module``
    the product uses forward-mode AD and falls back to double backward exactly
    as :class:`~curveball.CurveBall` does; without it, double backward. The
    module's buffers (running statistics) are left untouched.

    Args:
        model_fn: runs the model, returns the predictions.
        loss_fn: maps the predictions to a scalar loss.
        params: the parameters ``w`` (in ``module``, when given).
        vector: ``v``, one tensor per parameter.
        module: the module owning ``params`` (for forward mode).
        forward_mode: ``"auto"``, ``"forward"`` or ``"double-backward"``.

    Returns:
        ``G v``, one tensor per parameter.
    """
    params = list(params)
    vector = list(vector)
    if len(vector) != len(params) or any(
        v.shape != p.shape for v, p in zip(vector, params, strict=False)
    ):
        raise ValueError("vector: expected one tensor per parameter, shaped like it")
    tensors = ModuleTensors(module, params) if module is not None else None
    choice = EngineChoice(params, tensors, forward_mode)

    def product(engine) -> list[torch.Tensor]:
        y, jv = engine.linearize(model_fn, vector, jvp_follows=False)
        loss = LossDerivatives(loss_fn, y)
        return engine.vjp(loss.hvp(jv))

    if tensors is None:
        return _finished(choice, product, lambda: None)
    snapshot = BufferSnapshot(tensors.current_buffers)  # a product must not move statistics
    try:
        return _finished(choice, product, snapshot.restore)
    finally:
        snapshot.restore()


def _finished(choice: EngineChoice, product, undo) -> list[torch.Tensor]:
    try:
        return choice.run(product, undo)
    finally:
        choice.engine.finish()
