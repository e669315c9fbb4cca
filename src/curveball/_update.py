"""The update of a step: ``z ← ρ z − β d``, then ``w ← w + α z`` per parameter group.

Henriques et al., ICCV 2019, eq. 8–9: the running estimate ``z`` of the Newton
step takes one step along the (preconditioned) gradient ``d`` of the quadratic
model, with the momentum ρ and the step β, and the parameters move along it by
the learning rate α of their group (1 by default).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from curveball._param_vectors import HALF_PRECISION


def step_z_(
    zs: Sequence[torch.Tensor],
    d: Sequence[torch.Tensor],
    rho: float,
    beta: float,
    previous_step: Sequence[torch.Tensor] | None = None,
) -> None:
    """``z ← ρ z − β d`` in place; with ``previous_step`` p (an inner iteration along
    conjugate directions, :mod:`curveball._inner_loop`) ``z ← z + ρ p − β d``."""
    if previous_step is not None:
        torch._foreach_add_(list(zs), list(previous_step), alpha=rho)
        torch._foreach_add_(list(zs), list(d), alpha=-beta)
    elif any(z.dtype in HALF_PRECISION for z in zs):
        # ρ and β need not fit in float16 (β grows as the loss shrinks): combine in float32
        for z, x in zip(zs, d, strict=True):
            z.copy_(z.float().mul_(rho).sub_(x.float(), alpha=beta))
    else:
        torch._foreach_mul_(list(zs), rho)
        torch._foreach_add_(list(zs), list(d), alpha=-beta)


@torch.no_grad()
def move_(
    params: Sequence[torch.Tensor],
    zs: Sequence[torch.Tensor],
    members: Sequence[Sequence[int]],
    lrs: Sequence[float],
) -> None:
    """``w ← w + α z`` per group (``members[g]``: the indices of group ``g``'s parameters)."""
    for group, lr in zip(members, lrs, strict=True):
        if group and lr != 0.0:
            torch._foreach_add_([params[i] for i in group], [zs[i] for i in group], alpha=lr)
