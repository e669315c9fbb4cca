"""The scalars of one step, read from the device in a single host transfer.

A CurveBall step needs a handful of numbers on the host: the loss, a finiteness
flag of the predictions, the five network-side inner products of the quadratic
model and, per parameter group, the inner products of ``z``, ``Δz`` and ``w``.
They are gathered here into one float64 tensor, averaged over processes where
they depend on the batch, and moved to the host with one ``tolist()``: the only
host synchronisation of a step (plus one on trust-region test steps). The layout
of that tensor lives in this module alone; callers read the values by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from curveball._distributed import Averager

CURVATURE_TERMS = ("jdz_h_jdz", "jz_h_jdz", "jz_h_jz", "jl_jdz", "jl_jz")
"""Network-side terms: ``(JΔz)ᵀH_L(JΔz)``, ``(Jz)ᵀH_L(JΔz)``, ``(Jz)ᵀH_L(Jz)``,
``J_Lᵀ(JΔz)`` and ``J_Lᵀ(Jz)``."""

GROUP_TERMS = ("dz_dz", "z_dz", "z_z", "w_dz", "w_z", "raw_dz", "raw_z")
"""Parameter-side inner products, one value per parameter group (``raw_dz``: ``Δz``
before the preconditioner with the direction ``d``, on a curvature mini-batch or on an
inner iteration along conjugate directions; ``raw_z``: the same ``Δz`` with the previous
inner step, which takes the place of ``z`` there)."""


@dataclass(frozen=True)
class StepScalars:
    """The host values of one step; a term that was not computed is ``None``.

    Attributes:
        loss: the loss before the step (averaged over processes).
        predictions_finite: whether every prediction was finite on every process.
        curvature: the :data:`CURVATURE_TERMS` by name, when ρ and β are solved for.
        groups: the :data:`GROUP_TERMS` that were computed, by name, one float
            per parameter group.
    """

    loss: float
    predictions_finite: bool
    curvature: dict[str, float] | None
    groups: dict[str, tuple[float, ...]]

    def values(self) -> list[float]:
        """Every inner product of the step (the loss and the flag excluded)."""
        out = list(self.curvature.values()) if self.curvature is not None else []
        return out + [v for row in self.groups.values() for v in row]

    @staticmethod
    def read(
        loss: torch.Tensor,
        predictions: torch.Tensor,
        curvature: dict[str, torch.Tensor] | None,
        group_dots: dict[str, torch.Tensor],
        averager: Averager,
    ) -> StepScalars:
        """Pack, average the batch-dependent values, transfer once, unpack by name.

        Args:
            loss: the scalar loss.
            predictions: the predictions (only their finiteness is read).
            curvature: the :data:`CURVATURE_TERMS` as scalar tensors, or ``None``.
            group_dots: some of :data:`GROUP_TERMS`, each a tensor of one value per
                parameter group (identical on every process: not averaged).
            averager: averages over the processes.
        """
        ok = torch.isfinite(predictions.detach()).all()
        flag = torch.where(ok, 0.0, math.nan).to(torch.float64)  # averaging spreads a NaN
        data = [loss.detach().reshape(()).to(torch.float64), flag]
        if curvature is not None:
            data += [curvature[name].reshape(()).to(torch.float64) for name in CURVATURE_TERMS]
        data_vec = torch.stack(data)
        averager.mean_([data_vec])
        names = [name for name in GROUP_TERMS if name in group_dots]
        parts = [data_vec] + [group_dots[n].to(data_vec.device, torch.float64) for n in names]
        host = torch.cat(parts).tolist()  # the step's one host synchronisation
        curv = None
        if curvature is not None:
            curv = dict(zip(CURVATURE_TERMS, host[2:7], strict=True))
        offset = len(data)
        n = (len(host) - offset) // max(len(names), 1)
        groups = {
            name: tuple(host[offset + k * n : offset + (k + 1) * n]) for k, name in enumerate(names)
        }
        return StepScalars(
            loss=host[0], predictions_finite=math.isfinite(host[1]), curvature=curv, groups=groups
        )
