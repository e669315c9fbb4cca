"""The Poisson equation −Δu = f on [0, 1]ᵈ with Dirichlet data, and its manufactured solutions.

The residual terms (Dangel, Müller & Zeinhofer, NeurIPS 2024, §4 and appendix):

    interior:  r(x) = −Δu(x) − f(x),   x ∈ (0, 1)ᵈ,
    boundary:  r(x) = u(x) − u*(x),     x ∈ ∂[0, 1]ᵈ,

with f = −Δu* for a known solution u*:

* ``sin_product``: u*(x) = Πᵢ sin(πxᵢ), f = dπ² Πᵢ sin(πxᵢ), zero on the boundary
  (the paper's 2d problem: f = 2π² sin(πx) sin(πy));
* ``cos_sum``: u*(x) = Σᵢ cos(πxᵢ), f = π² Σᵢ cos(πxᵢ) (the paper's 5d problem).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.pdes.domains import cube_boundary, uniform_cube
from benchmarks.pdes.operators import (
    PointFunction,
    evaluate_with_input_grad,
    laplacian,
    point_laplacian,
)
from benchmarks.pdes.residual import Points


@dataclass(frozen=True)
class Solution:
    """A manufactured solution u* and its right-hand side f = −Δu*, for points ``(..., d)``."""

    name: str
    value: Callable[[torch.Tensor], torch.Tensor]
    forcing: Callable[[torch.Tensor], torch.Tensor]


def _sin_product(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(math.pi * x).prod(dim=-1)


def _cos_sum(x: torch.Tensor) -> torch.Tensor:
    return torch.cos(math.pi * x).sum(dim=-1)


SIN_PRODUCT = Solution(
    "sin_product", _sin_product, lambda x: x.shape[-1] * math.pi**2 * _sin_product(x)
)
COS_SUM = Solution("cos_sum", _cos_sum, lambda x: math.pi**2 * _cos_sum(x))


class Poisson:
    """−Δu = f on [0, 1]ᵈ, u = u* on the boundary, for a manufactured solution u*.

    Args:
        dim: d, the number of space dimensions.
        solution: u* and its f (:data:`SIN_PRODUCT` or :data:`COS_SUM`).
    """

    terms = ("interior", "boundary")

    def __init__(self, dim: int, solution: Solution) -> None:
        self.dim, self.solution = dim, solution
        self.name = f"poisson{dim}d-{solution.name}"

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        """u*(x) for points of shape ``(..., d)``."""
        return self.solution.value(x)

    def sample(self, counts: dict[str, int], generator: torch.Generator) -> Points:
        """Uniform points in the cube's interior and on its boundary (float64, CPU)."""
        return {
            "interior": uniform_cube(counts["interior"], self.dim, generator),
            "boundary": cube_boundary(counts["boundary"], self.dim, generator),
        }

    def residuals(self, model: nn.Module, points: Points) -> dict[str, torch.Tensor]:
        """−Δu − f inside and u − u* on the boundary, the user's way (``autograd.grad``)."""
        u, x = evaluate_with_input_grad(model, points["interior"])
        boundary = points["boundary"]
        return {
            "interior": -laplacian(u, x) - self.solution.forcing(x.detach()),
            "boundary": model(boundary).squeeze(-1) - self.exact(boundary),
        }

    def point_residual(self, term: str, u: PointFunction, x: torch.Tensor) -> torch.Tensor:
        """One term's residual at one point, the functional way (``torch.func.hessian``)."""
        if term == "interior":
            return -point_laplacian(u, x) - self.solution.forcing(x)
        if term == "boundary":
            return u(x) - self.exact(x)
        raise KeyError(f"term: expected one of {self.terms}, got {term!r}")
