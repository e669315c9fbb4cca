"""The dense Gauss-Newton matrix of a step, and its damped inverse as a preconditioner.

Where the parameter count ``D`` (or the number of predictions ``N``) is small — a
physics-informed network of a few hundred to a few thousand parameters — the
Gauss-Newton matrix ``G = Jᵀ H_L J`` can be formed outright: ``J`` column by
column from ``D`` forward-mode passes (``J eᵢ``), or row by row from ``N``
backward passes through the retained graph (``Jᵀ eₙ``) when ``N < D``; then
``H_L J`` (closed form or autograd) and ``G`` in float64. With its
eigendecomposition ``G = U S Uᵀ``,

    P = (G + λI)⁻¹ = U (S + λI)⁻¹ Uᵀ

for any λ at the cost of two products with ``U``. As the preconditioner of
:mod:`curveball._inner_loop`, ``d = P Δz`` makes the 2×2 solve exact: with
``Δz = (G + λI) z + g``, ``z − d = −(G + λI)⁻¹ g``, the damped Newton step, which the
plane's minimiser finds (ρ = β = 1) — one step of CurveBall with this preconditioner
is a Levenberg-Marquardt step (Levenberg 1944, Marquardt 1963), and of the energy
natural gradient of physics-informed networks with λ → 0 (Müller & Zeinhofer, ICML
2023). Refreshed only every few steps, ``P`` is the damped inverse of a nearby
matrix, and conjugate inner iterations (``solver="conjugate"``) correct for the
difference: preconditioned conjugate gradients.

Eigenvalues below :data:`RELATIVE_FLOOR` times the largest count as that floor, so
that ``P`` stays bounded at λ = 0 (the pseudo-inverse's cut-off of a least-squares
solve).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from curveball._curvature.engine import JacobianEngine
from curveball._curvature.loss_derivatives import LossDerivatives
from curveball._param_vectors import real_view

RELATIVE_FLOOR = 1e-12
"""Eigenvalues of ``G`` below this times the largest are raised to it."""


def _one_hot(params: Sequence[torch.Tensor]):
    """The standard basis of the parameter space (of complex parameters' pairs), one
    tangent list at a time."""
    basis = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
    for tensor in basis:
        flat = real_view(tensor).view(-1)
        for i in range(flat.numel()):
            flat[i] = 1.0
            yield basis
            flat[i] = 0.0


def jacobian(
    engine: JacobianEngine, params: Sequence[torch.Tensor], predictions: torch.Tensor
) -> torch.Tensor:
    """``J`` (the predictions × ``D`` parameters, float64) at the engine's point:
    by columns (forward mode) or, with fewer predictions than parameters, by rows."""
    shape = predictions.shape
    size, rows = sum(real_view(p).numel() for p in params), shape.numel()
    if size <= rows:
        columns = [engine.jvp(basis).reshape(-1).double() for basis in _one_hot(params)]
        return torch.stack(columns, dim=1)
    cotangent = torch.zeros(rows, dtype=predictions.dtype, device=predictions.device)
    out = []
    for n in range(rows):
        cotangent[n] = 1.0
        row = engine.vjp(cotangent.view(shape), keep_graph=True)
        out.append(torch.cat([real_view(r).reshape(-1) for r in row]).double())
        cotangent[n] = 0.0
    return torch.stack(out)


def gauss_newton(
    engine: JacobianEngine,
    params: Sequence[torch.Tensor],
    loss: LossDerivatives,
    jac: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``G = Jᵀ H_L J`` and ``Jᵀ J_L`` (float64) at the engine's point (``jac``: ``J``
    if it is known already, from the model function itself).

    Raises:
        ValueError: if ``jac`` is not of the predictions' count × the parameters' size.
    """
    shape = loss.predictions.shape
    if jac is None:
        jac = jacobian(engine, params, loss.predictions)
    expected = (shape.numel(), sum(real_view(p).numel() for p in params))
    if tuple(jac.shape) != expected:
        raise ValueError(
            f"model_fn.jacobian: expected a {expected[0]} × {expected[1]} Jacobian (the "
            f"predictions × the parameters), got {tuple(jac.shape)}"
        )
    h_jac = loss.hvp_columns(jac).double()
    g = 0.5 * (jac.T @ h_jac + h_jac.T @ jac)
    return g, jac.T @ loss.grad.detach().reshape(-1).double()


class DenseInverse:
    """``(G + λI)⁻¹`` for any λ from one eigendecomposition of ``G`` (see the module doc)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        values, self.vectors = torch.linalg.eigh(matrix)
        top = values.abs().max() if values.numel() else torch.tensor(0.0)
        self.values = values.clamp_min(RELATIVE_FLOOR * float(top))

    def apply(self, vector: Sequence[torch.Tensor], damping: float) -> list[torch.Tensor]:
        """``(G + damping·I)⁻¹ v`` for ``v`` one tensor per parameter."""
        flat = torch.cat([real_view(v).reshape(-1) for v in vector]).double()
        solved = self.vectors @ ((self.vectors.T @ flat) / (self.values + damping))
        pieces = torch.split(solved, [real_view(v).numel() for v in vector])
        return [_shaped(x, v) for x, v in zip(pieces, vector, strict=True)]


def _shaped(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``flat`` (float64) in the shape and dtype of ``like`` (complex: from its pairs)."""
    view = real_view(like)
    out = flat.view(view.shape).to(view.dtype)
    return torch.view_as_complex(out) if like.is_complex() else out
