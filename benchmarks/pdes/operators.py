"""The differential operators the PDEs share, each written two ways.

* The user's way, on a batch: ``u`` is the model's output on collocation points ``x``
  that require gradients, and the derivatives come from
  ``torch.autograd.grad(..., create_graph=True)`` (as deepxde, PINA and the papers write
  them). The result stays differentiable in the parameters.
* The functional way, on one point: ``u`` is a function ``ℝᵈ → ℝ`` of a single point
  and the derivatives come from ``torch.func`` (``jacrev``, ``hessian``), so that
  ``torch.func.vmap`` over points and ``torch.func.grad`` over parameters compose with
  them (the baselines' per-sample Jacobians).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

PointFunction = Callable[[torch.Tensor], torch.Tensor]
"""A scalar function of one point ``x ∈ ℝᵈ`` (a tensor of shape ``(d,)``)."""


# ----------------------------------------------------------------------- the user's way
def gradient(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """∇ₓu on a batch: ``u`` of shape ``(N,)`` computed from ``x`` of shape ``(N, d)``.

    Returns ``(N, d)``, differentiable again (``create_graph=True``)."""
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    return du


def second_partial(du: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
    """∂²u/∂xᵢ² on a batch, from the gradient ``du = ∇ₓu`` of shape ``(N, d)``."""
    (ddu,) = torch.autograd.grad(du[:, i].sum(), x, create_graph=True)
    return ddu[:, i]


def laplacian(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Δu = Σᵢ ∂²u/∂xᵢ² on a batch (one double-backward pass per input dimension)."""
    du = gradient(u, x)
    return sum(second_partial(du, x, i) for i in range(x.shape[1]))


def evaluate_with_input_grad(
    model: nn.Module, points: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, x)``: a copy ``x`` of ``points`` that requires gradients and ``u = model(x)``
    of shape ``(N,)``, ready for :func:`gradient` and :func:`laplacian`."""
    x = points.detach().clone().requires_grad_(True)
    return model(x).squeeze(-1), x


# ----------------------------------------------------------------------- the functional way
def point_model(model: nn.Module, params: dict[str, torch.Tensor]) -> PointFunction:
    """The network with parameters ``params`` as a function of one point, ``x ↦ u_θ(x)``."""

    def u(x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (x.unsqueeze(0),)).squeeze()

    return u


def point_gradient(u: PointFunction, x: torch.Tensor) -> torch.Tensor:
    """∇ₓu(x) at one point, by reverse mode (``torch.func.jacrev``); shape ``(d,)``."""
    return jacrev(u)(x)


def point_hessian(u: PointFunction, x: torch.Tensor) -> torch.Tensor:
    """∇ₓ²u(x) at one point (``torch.func.hessian``: forward over reverse); ``(d, d)``."""
    return hessian(u)(x)


def point_laplacian(u: PointFunction, x: torch.Tensor) -> torch.Tensor:
    """Δu(x) = tr ∇ₓ²u(x) at one point; a scalar."""
    return torch.trace(point_hessian(u, x))
