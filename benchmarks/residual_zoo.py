"""Residual models that differentiate the network with respect to its inputs, two ways each.

The conformance families of physics-informed and derivative-matching losses.
Every family returns ONE residual vector ``r`` (each part divided by the square
root of its point count), so that the loss is ``L = ½‖r‖²`` (the mean of each
part's squares, halved), and writes it both ways people write such code:

* ``"autograd"``: ``torch.autograd.grad(..., create_graph=True)`` on points
  created with ``requires_grad=True`` (deepxde, PINA and most papers);
* ``"func"``: ``torch.func`` transforms of the network on a single point
  (``vmap`` over the points of ``jacrev``/``hessian``).

Families: Poisson 2D with a boundary term (``−Δu − f``), heat 1D with initial and
boundary terms (``∂ₜu − ¼∂ₓ²u``), a biharmonic residual in 2D (``Δ²u − f``, fourth
order), a WGAN-GP style gradient penalty (``‖∇ₓD(x)‖ − 1`` beside the critic's
values) and a Sobolev loss (values and input gradients against a target
function's). The dense oracle :func:`dense_residual_problem` differentiates the
``"func"`` form with ``torch.func.jacrev``, independently of the library.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

WAYS = ("autograd", "func")
Points = dict[str, torch.Tensor]


def tanh_mlp(widths: tuple[int, ...]) -> nn.Module:
    """``Linear`` layers of the given widths with tanh between them."""
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(cin, cout))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


# ------------------------------------------------------------------ derivatives, two ways
def _grad(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return g


def autograd_gradient(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``∇ₓu`` per point (rows of ``x``) by ``torch.autograd.grad``."""
    return _grad(u, x)


def autograd_laplacian(u: torch.Tensor, x: torch.Tensor, dims: int | None = None) -> torch.Tensor:
    """``Σᵢ ∂²u/∂xᵢ²`` over the first ``dims`` coordinates, by nested ``autograd.grad``."""
    g = _grad(u, x)
    dims = x.shape[1] if dims is None else dims
    return sum(_grad(g[:, i], x)[:, i] for i in range(dims))


def _scalar(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda xi: model(xi.unsqueeze(0)).squeeze()


def func_gradient(f: Callable, x: torch.Tensor) -> torch.Tensor:
    """``∇f`` per point by ``vmap(jacrev(f))``."""
    return vmap(jacrev(f))(x)


def func_laplacian(f: Callable, dims: int | None = None) -> Callable:
    """The single-point function ``x ↦ Σᵢ ∂²f/∂xᵢ²`` (first ``dims`` coordinates)."""

    def laplacian(xi: torch.Tensor) -> torch.Tensor:
        h = hessian(f)(xi)
        n = xi.shape[0] if dims is None else dims
        return h.diagonal()[:n].sum()

    return laplacian


# ------------------------------------------------------------------------------ families
def _interior(g: torch.Generator, n: int, d: int) -> torch.Tensor:
    return torch.rand(n, d, generator=g, dtype=torch.float64)


def _square_edge(g: torch.Generator, n: int) -> torch.Tensor:
    """``n`` points on the boundary of the unit square."""
    t = torch.rand(n, generator=g, dtype=torch.float64)
    side = torch.arange(n) % 4
    x = torch.where(side < 2, t, (side == 3).to(torch.float64))
    y = torch.where(side < 2, (side == 1).to(torch.float64), t)
    return torch.stack([x, y], dim=1)


def _scaled(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat([p.reshape(-1) / math.sqrt(p.numel()) for p in parts])


def _poisson(model: nn.Module, pts: Points, way: str) -> torch.Tensor:
    x, xb = pts["interior"], pts["boundary"]
    f = 2 * math.pi**2 * torch.sin(math.pi * x[:, 0]) * torch.sin(math.pi * x[:, 1])
    if way == "autograd":
        lap = autograd_laplacian(model(x).squeeze(-1), x)
    else:
        lap = vmap(func_laplacian(_scalar(model)))(x)
    return _scaled(-lap - f.detach(), model(xb).squeeze(-1))


def _heat(model: nn.Module, pts: Points, way: str) -> torch.Tensor:
    """Points are ``(x, t)``: ``∂ₜu − ¼∂ₓ²u``, ``u(x, 0) − sin πx``, ``u(0, t)``, ``u(1, t)``."""
    x, x0, xb = pts["interior"], pts["initial"], pts["boundary"]
    if way == "autograd":
        u = model(x).squeeze(-1)
        ut = autograd_gradient(u, x)[:, 1]
        uxx = autograd_laplacian(u, x, dims=1)
    else:
        f = _scalar(model)
        ut = func_gradient(f, x)[:, 1]
        uxx = vmap(func_laplacian(f, dims=1))(x)
    initial = model(x0).squeeze(-1) - torch.sin(math.pi * x0[:, 0])
    return _scaled(ut - 0.25 * uxx, initial, model(xb).squeeze(-1))


def _biharmonic(model: nn.Module, pts: Points, way: str) -> torch.Tensor:
    x, xb = pts["interior"], pts["boundary"]
    if way == "autograd":
        u = model(x).squeeze(-1)
        bilap = autograd_laplacian(autograd_laplacian(u, x), x)
    else:
        bilap = vmap(func_laplacian(func_laplacian(_scalar(model))))(x)
    f = 4 * math.pi**4 * torch.sin(math.pi * x[:, 0]) * torch.sin(math.pi * x[:, 1])
    return _scaled(bilap - f.detach(), model(xb).squeeze(-1))


def _gradient_penalty(model: nn.Module, pts: Points, way: str) -> torch.Tensor:
    """A critic's values on real points against 1 and ``‖∇ₓD(x̂)‖ − 1`` on interpolates."""
    real, mixed = pts["real"], pts["interpolates"]
    if way == "autograd":
        grad = autograd_gradient(model(mixed).squeeze(-1), mixed)
    else:
        grad = func_gradient(_scalar(model), mixed)
    return _scaled(model(real).squeeze(-1) - 1.0, grad.norm(dim=1) - 1.0)


def _sobolev(model: nn.Module, pts: Points, way: str) -> torch.Tensor:
    """Values and input gradients against ``t(x) = sin(x₁) cos(x₂) + x₃²``'s."""
    x = pts["points"]
    target = torch.sin(x[:, 0]) * torch.cos(x[:, 1]) + x[:, 2] ** 2
    target_grad = torch.stack(
        [torch.cos(x[:, 0]) * torch.cos(x[:, 1]), -torch.sin(x[:, 0]) * torch.sin(x[:, 1]),
         2 * x[:, 2]], dim=1,
    )  # fmt: skip
    if way == "autograd":
        u = model(x).squeeze(-1)
        grad = autograd_gradient(u, x)
    else:
        u = model(x).squeeze(-1)
        grad = func_gradient(_scalar(model), x)
    return _scaled(u - target.detach(), grad - target_grad.detach())


@dataclass(frozen=True)
class ResidualFamily:
    """One residual model: a network, its named point sets and the residual both ways."""

    name: str
    widths: tuple[int, ...]
    points: Callable[[torch.Generator], Points]
    residual: Callable[[nn.Module, Points, str], torch.Tensor]

    def make(self, seed: int = 0) -> tuple[nn.Module, Points]:
        """A seeded float64 network and its points (those that input derivatives are taken
        at with ``requires_grad=True``)."""
        torch.manual_seed(seed)
        model = tanh_mlp(self.widths).double()
        g = torch.Generator().manual_seed(seed + 1)
        return model, self.points(g)

    def model_fn(self, model: nn.Module, pts: Points, way: str) -> Callable[[], torch.Tensor]:
        if way not in WAYS:
            raise ValueError(f"way: expected one of {WAYS}, got {way!r}")
        return lambda: self.residual(model, pts, way)


def _points(**sets: tuple[Callable[[torch.Generator], torch.Tensor], bool]):
    def draw(g: torch.Generator) -> Points:
        out = {}
        for name, (sample, differentiated) in sets.items():
            t = sample(g)
            out[name] = t.requires_grad_() if differentiated else t
        return out

    return draw


def _interpolates(g: torch.Generator) -> torch.Tensor:
    a, b = torch.randn(6, 3, generator=g, dtype=torch.float64), _interior(g, 6, 3)
    eps = torch.rand(6, 1, generator=g, dtype=torch.float64)
    return eps * a + (1 - eps) * b


RESIDUAL_ZOO = {
    f.name: f
    for f in (
        ResidualFamily("poisson 2d", (2, 8, 8, 1), _points(
            interior=(lambda g: _interior(g, 10, 2), True),
            boundary=(lambda g: _square_edge(g, 8), False)), _poisson),
        ResidualFamily("heat 1d", (2, 8, 8, 1), _points(
            interior=(lambda g: _interior(g, 10, 2), True),
            initial=(lambda g: torch.cat([_interior(g, 4, 1), torch.zeros(4, 1,
                     dtype=torch.float64)], dim=1), False),
            boundary=(lambda g: torch.cat([(torch.arange(4) % 2).double()[:, None],
                      _interior(g, 4, 1)], dim=1), False)), _heat),
        ResidualFamily("biharmonic 2d", (2, 6, 6, 1), _points(
            interior=(lambda g: _interior(g, 6, 2), True),
            boundary=(lambda g: _square_edge(g, 6), False)), _biharmonic),
        ResidualFamily("gradient penalty", (3, 8, 1), _points(
            real=(lambda g: torch.randn(6, 3, generator=g, dtype=torch.float64), False),
            interpolates=(_interpolates, True)), _gradient_penalty),
        ResidualFamily("sobolev", (3, 8, 8, 1), _points(
            points=(lambda g: _interior(g, 8, 3), True)), _sobolev),
    )
}  # fmt: skip
"""The families by name."""


def dense_residual_problem(family: ResidualFamily, model: nn.Module, pts: Points) -> dict:
    """Dense ``J`` (residuals × parameters), ``r``, ``g = Jᵀr`` and ``G = JᵀJ`` for
    ``L = ½‖r‖²``, by ``torch.func.jacrev`` of the ``"func"`` form."""
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    fixed = {k: v.detach() for k, v in pts.items()}

    def residual(w: torch.Tensor) -> torch.Tensor:
        tensors = {n: c.view(s) for n, c, s in zip(names, torch.split(w, sizes), shapes,
                                                    strict=True)}  # fmt: skip

        class Bound(nn.Module):
            def forward(self, x):
                return functional_call(model, tensors, (x,))

        return family.residual(Bound(), fixed, "func")

    w = torch.cat([p.reshape(-1) for _, p in named])
    r = residual(w).detach()
    jac = jacrev(residual)(w)
    return {"J": jac, "r": r, "g": jac.T @ r, "G": jac.T @ jac, "w": w}
