"""Generalised Gauss-Newton products ``G v = Jᵀ H_L J v``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import nn

from curveball.curvature.double_backward import DoubleBackwardEngine
from curveball.curvature.engine import JacobianEngine
from curveball.curvature.forward_mode import ForwardModeEngine
from curveball.curvature.substitution import ModuleTensors
from curveball.losses import LossDerivatives


def ggn_vector_product(
    model_fn: Callable[[], torch.Tensor],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    params: Sequence[torch.Tensor],
    vector: Sequence[torch.Tensor],
    module: nn.Module | None = None,
) -> list[torch.Tensor]:
    """The product of the generalised Gauss-Newton matrix with ``vector``.

    ``G = Jᵀ H_L J`` with ``J`` the Jacobian of ``model_fn()`` with respect to
    ``params`` and ``H_L`` the Hessian of ``loss_fn`` at the predictions
    (Schraudolph 2002; Henriques et al., ICCV 2019, eq. 4). With ``module``
    the product uses forward-mode AD, else the double-backward fallback.
    The module's buffers (running statistics) are left untouched.

    Returns one tensor per parameter.
    """
    params = list(params)
    if module is None:
        engine: JacobianEngine = DoubleBackwardEngine(params)
        scratch = nullcontext()
    else:
        tensors = ModuleTensors(module, params)
        engine = ForwardModeEngine(params, tensors)
        # Run on copies of the buffers: a product must not move running statistics.
        scratch = tensors.substituted(buffers=[b.clone() for b in tensors.current_buffers()])
    with scratch:
        y, jv = engine.linearize(model_fn, list(vector))
    loss = LossDerivatives(loss_fn, y)
    out = engine.vjp(loss.hvp(jv))
    engine.finish()
    return out
