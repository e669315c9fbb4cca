"""What every PDE provides, and the residual vector built from it, written two ways.

A PINN loss is a sum of mean squares of residual terms (interior, boundary, initial ...),

    L(θ) = Σₜ ½ · mean_{x ∈ Xₜ} rₜ(θ, x)²  =  ½ ‖r(θ)‖²,
    r(θ) = concat_t( rₜ(θ, Xₜ) / √Nₜ ),

so a single residual vector ``r`` of length N = Σₜ Nₜ carries the whole loss, and its
Jacobian J = ∂r/∂θ (N × D) gives the Gauss-Newton matrix JᵀJ, which for this loss is the
Gramian of energy natural gradient descent (Müller & Zeinhofer, ICML 2023).

* :func:`residual_vector` is the user's way (``torch.autograd.grad`` on points that require
  gradients): what CurveBall, Adam and L-BFGS differentiate.
* :class:`FunctionalResidual` is the per-point functional way (``torch.func``): ``r(θ)`` as a
  function of the parameter tuple, vmapped over points, and its per-sample Jacobian by
  reverse mode (``vmap`` over points of ``grad`` of the per-point residual), for ENGD and
  Hessian-free.
* :func:`pointwise_residual` is the same per-point residual as the library's
  :class:`curveball.pointwise.PointwiseResidual`, a ``model_fn`` that also gives CurveBall
  its Jacobian by per-point reverse mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn
from torch.func import grad_and_value, vmap

from benchmarks.pdes.operators import PointFunction, point_model
from curveball.pointwise import PointwiseResidual, Term

Points = dict[str, torch.Tensor]
"""Collocation points by residual term, each of shape ``(Nₜ, d)``."""


class PDE(Protocol):
    """A PDE on [0, 1]ᵈ with a known solution, as the race and the baselines use it."""

    name: str
    dim: int
    terms: tuple[str, ...]  # the residual terms, in the order of the residual vector

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        """u*(x) for points of shape ``(..., d)``; shape ``(...)``."""

    def sample(self, counts: dict[str, int], generator: torch.Generator) -> Points:
        """Fresh collocation points, ``counts[t]`` for each term ``t`` (float64, CPU)."""

    def residuals(self, model: nn.Module, points: Points) -> dict[str, torch.Tensor]:
        """Every term's residuals on its points, the user's way (``autograd.grad``)."""

    def point_residual(self, term: str, u: PointFunction, x: torch.Tensor) -> torch.Tensor:
        """One term's residual at one point ``x`` of shape ``(d,)``, for a function ``u``."""


def residual_vector(pde: PDE, model: nn.Module, points: Points) -> torch.Tensor:
    """r = concat_t(rₜ / √Nₜ), the user's way, so that L = ½‖r‖²; differentiable in θ."""
    parts = pde.residuals(model, points)
    return torch.cat([parts[t] / math.sqrt(len(points[t])) for t in pde.terms])


def half_squared_norm(r: torch.Tensor) -> torch.Tensor:
    """The PINN loss from its residual vector, L = ½‖r‖²."""
    return 0.5 * (r**2).sum()


def pointwise_residual(pde: PDE, model: nn.Module, points: Points) -> PointwiseResidual:
    """r = concat_t(rₜ / √Nₜ) written point by point (``torch.func``), as a CurveBall
    ``model_fn`` that carries its Jacobian by per-point reverse mode."""

    def term(name: str):
        def fn(u: PointFunction, x: torch.Tensor) -> torch.Tensor:
            return pde.point_residual(name, lambda y: u(y).squeeze(), x)

        return Term(fn, points[name], 1.0 / math.sqrt(len(points[name])))

    return PointwiseResidual(model, [term(name) for name in pde.terms])


class FunctionalResidual:
    """``r(θ)`` and ``J(θ) = ∂r/∂θ`` on one set of points, as functions of a parameter tuple.

    The tuple's entries match ``model.parameters()`` in order and shape; the columns of J
    are those parameters flattened and concatenated in that order.

    Args:
        pde: the equation (its per-point residuals).
        model: the network (only its structure is used; parameters come as arguments).
        points: collocation points by term.
    """

    def __init__(self, pde: PDE, model: nn.Module, points: Points) -> None:
        self.pde, self.model, self.points = pde, model, points
        self.names = [name for name, _ in model.named_parameters()]

    def parameters(self) -> tuple[torch.Tensor, ...]:
        """The model's current parameters, detached."""
        return tuple(p.detach() for p in self.model.parameters())

    def _point(self, term: str):
        def residual(params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            u = point_model(self.model, dict(zip(self.names, params, strict=True)))
            return self.pde.point_residual(term, u, x)

        return residual

    def __call__(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """r(θ) = concat_t(rₜ(θ, Xₜ) / √Nₜ), vmapped over each term's points."""
        parts = []
        for term in self.pde.terms:
            x = self.points[term]
            parts.append(vmap(self._point(term), in_dims=(None, 0))(tuple(params), x))
            parts[-1] = parts[-1] / math.sqrt(len(x))
        return torch.cat(parts)

    def jacobian(self, params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r, J)`` at θ: J (N × D) by per-sample reverse mode, ``vmap`` over points of
        ``grad`` of the per-point residual (one backward pass per point, batched)."""
        rows, values = [], []
        for term in self.pde.terms:
            x = self.points[term]
            per_point = vmap(grad_and_value(self._point(term)), in_dims=(None, 0))
            grads, value = per_point(tuple(params), x)
            scale = 1.0 / math.sqrt(len(x))
            rows.append(torch.cat([g.reshape(len(x), -1) for g in grads], dim=1) * scale)
            values.append(value * scale)
        return torch.cat(values), torch.cat(rows)
