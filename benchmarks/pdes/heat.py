"""The 1+1-dimensional heat equation ∂ₜu − ¼∂ₓ²u = 0 on (x, t) ∈ [0, 1]², and its solution.

Points are ``(x, t)``: column 0 is space, column 1 is time. The residual terms (Dangel,
Müller & Zeinhofer, NeurIPS 2024, appendix):

    interior:  r(x, t) = ∂ₜu − ¼ ∂ₓ²u,         (x, t) ∈ (0, 1)²,
    initial:   r(x, 0) = u(x, 0) − sin(πx),     x ∈ [0, 1],
    boundary:  r(x, t) = u(x, t),               x ∈ {0, 1}, t ∈ [0, 1],

whose solution is u*(x, t) = exp(−π²t/4) sin(πx).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from benchmarks.pdes.domains import uniform_cube
from benchmarks.pdes.operators import (
    PointFunction,
    evaluate_with_input_grad,
    gradient,
    point_gradient,
    point_hessian,
    second_partial,
)
from benchmarks.pdes.residual import Points

DIFFUSIVITY = 0.25
X, T = 0, 1  # the columns of a point


class Heat1D:
    """∂ₜu − κ∂ₓ²u = 0 (κ = ¼) on [0, 1]², u(x, 0) = sin(πx), u(0, t) = u(1, t) = 0."""

    name = "heat1d"
    dim = 2
    terms = ("interior", "initial", "boundary")

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        """u*(x, t) = exp(−π²t/4) sin(πx), for points of shape ``(..., 2)``."""
        decay = torch.exp(-(math.pi**2) * DIFFUSIVITY * x[..., T])
        return decay * torch.sin(math.pi * x[..., X])

    def sample(self, counts: dict[str, int], generator: torch.Generator) -> Points:
        """Uniform interior points; initial points (x, 0) with x uniform; boundary points
        (x, t) with x ∈ {0, 1} (each with probability ½) and t uniform (float64, CPU)."""
        initial = uniform_cube(counts["initial"], 2, generator)
        initial[:, T] = 0.0
        boundary = uniform_cube(counts["boundary"], 2, generator)
        side = torch.randint(2, (counts["boundary"],), generator=generator)
        boundary[:, X] = side.to(torch.float64)
        return {
            "interior": uniform_cube(counts["interior"], 2, generator),
            "initial": initial,
            "boundary": boundary,
        }

    def residuals(self, model: nn.Module, points: Points) -> dict[str, torch.Tensor]:
        """The three terms' residuals, the user's way (``autograd.grad``)."""
        u, z = evaluate_with_input_grad(model, points["interior"])
        du = gradient(u, z)
        initial = points["initial"]
        return {
            "interior": du[:, T] - DIFFUSIVITY * second_partial(du, z, X),
            "initial": model(initial).squeeze(-1) - torch.sin(math.pi * initial[:, X]),
            "boundary": model(points["boundary"]).squeeze(-1),
        }

    def point_residual(self, term: str, u: PointFunction, x: torch.Tensor) -> torch.Tensor:
        """One term's residual at one point, the functional way (``torch.func``)."""
        if term == "interior":
            return point_gradient(u, x)[T] - DIFFUSIVITY * point_hessian(u, x)[X, X]
        if term == "initial":
            return u(x) - torch.sin(math.pi * x[X])
        if term == "boundary":
            return u(x)
        raise KeyError(f"term: expected one of {self.terms}, got {term!r}")
