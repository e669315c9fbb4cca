"""Dynamic scaling of the backward pass when float16 is in use.

In float16 the back-propagated ``Jᵀ u`` (``u = H_L J z + J_L``) can underflow to
zero. As a gradient scaler does for ``loss.backward()``, the cotangent is
multiplied by a scale ``S`` (a power of two, so that undoing it is exact) and
``Δz`` divided by it again. If the scaled pass overflows, the step is skipped and
``S`` halved — an overflow of the scale is not a fault of the model, so λ stays
as it is; after :data:`GROWTH_INTERVAL` finite steps in a row ``S`` doubles. The
scale is active when a trainable parameter is float16 or autocast runs in float16
on the parameters' device, and it lives in the optimizer state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GROWTH_INTERVAL = 1000
"""Finite float16 steps after which the scale doubles."""

MIN_SCALE = 2.0**-24
"""Below this the scale is not the cause: an overflow is then an ordinary fault."""


def float16_in_use(params: Sequence[torch.Tensor]) -> bool:
    """Whether a parameter is float16 or autocast computes in float16 on their device."""
    if any(p.dtype == torch.float16 for p in params):
        return True
    device = params[0].device.type
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16


def after_overflow(scale: float) -> float:
    return scale / 2.0


def after_finite(scale: float, finite_steps: int) -> tuple[float, int]:
    """The scale and the count of finite steps after one more finite step."""
    finite_steps += 1
    if finite_steps >= GROWTH_INTERVAL:
        return scale * 2.0, 0
    return scale, finite_steps
