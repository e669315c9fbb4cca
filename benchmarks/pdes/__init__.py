"""PINN problems for the race (``benchmarks.pinn_race``): the PDEs and the registry of tasks.

Each equation is a module of its own, with its exact solution beside it
(:mod:`~benchmarks.pdes.poisson`, :mod:`~benchmarks.pdes.heat`); the differential operators
they share are in :mod:`~benchmarks.pdes.operators`, the residual vector and its Jacobian in
:mod:`~benchmarks.pdes.residual`. A new PDE adds a module and a :class:`Task` here.

The tasks are those of Dangel, Müller & Zeinhofer, "Kronecker-factored approximate curvature
for physics-informed neural networks" (NeurIPS 2024, arXiv:2405.15603): tanh MLPs in
float64 with PyTorch's default initialisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from torch import nn

from benchmarks import common
from benchmarks.pdes.heat import Heat1D
from benchmarks.pdes.poisson import COS_SUM, SIN_PRODUCT, Poisson
from benchmarks.pdes.residual import (
    PDE,
    FunctionalResidual,
    Points,
    half_squared_norm,
    pointwise_residual,
    residual_vector,
)

__all__ = [
    "PDE",
    "TASKS",
    "FunctionalResidual",
    "Points",
    "Task",
    "half_squared_norm",
    "pointwise_residual",
    "residual_vector",
]


@dataclass(frozen=True)
class Task:
    """A PINN problem: the equation, the network, the collocation points.

    Args:
        name: the task's name in the race.
        pde: the equation.
        widths: the tanh MLP's layer widths, input dimension first.
        counts: collocation points per residual term.
        resample: draw fresh points every step (else one set, drawn once, fixed).
    """

    name: str
    pde: PDE
    widths: tuple[int, ...]
    counts: dict[str, int]
    resample: bool

    def build(self) -> nn.Module:
        """A fresh network, PyTorch's default initialisation (seed the global RNG first)."""
        return common.mlp(self.widths, nn.Tanh)

    def shrunk(self, factor: float) -> Task:
        """The same task with ``factor`` times as many points per term (at least 4 each)."""
        counts = {t: max(4, math.ceil(n * factor)) for t, n in self.counts.items()}
        return replace(self, counts=counts)

    def describe(self) -> str:
        """One line: the network and the points."""
        points = " / ".join(f"{n} {t}" for t, n in self.counts.items())
        kind = "drawn afresh every step" if self.resample else "drawn once, fixed"
        return f"{'→'.join(map(str, self.widths))} tanh MLP; {points} points, {kind}"


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("poisson2d", Poisson(2, SIN_PRODUCT), (2, 64, 1), {"interior": 900, "boundary": 120},
             resample=False),
        Task("heat1d", Heat1D(), (2, 64, 1),
             {"interior": 900, "initial": 60, "boundary": 60}, resample=False),
        Task("poisson5d", Poisson(5, COS_SUM), (5, 64, 1), {"interior": 3000, "boundary": 500},
             resample=True),
        Task("poisson5d-deep", Poisson(5, COS_SUM), (5, 64, 64, 48, 48, 1),
             {"interior": 3000, "boundary": 500}, resample=True),
    )
}  # fmt: skip
"""The four tasks of the race, by name."""
