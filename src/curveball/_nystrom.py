"""A randomized low-rank (Nyström) preconditioner from Gauss-Newton-vector products.

Where the dense Gauss-Newton matrix is too large to form (:mod:`curveball._gauss_newton`),
a sketch of it is not: ``Y = G Ω`` for a Gaussian test matrix ``Ω`` of ``s`` columns costs
``s`` products ``G v = Jᵀ H_L J v`` (a forward-mode and a backward pass each). The Nyström
approximation ``G ≈ Y (ΩᵀY)⁺ Yᵀ = U Λ Uᵀ`` (rank ``s``; the stable form of Frangella,
Tropp & Udell, "Randomized Nyström preconditioning", SIAM J. Matrix Anal. Appl. 2023,
Algorithm 2.1, with a shift ``ν`` for the Cholesky factor) gives the preconditioner

    P = (λ_s + μ) U (Λ + μI)⁻¹ Uᵀ + (I − U Uᵀ),    μ the damping,

which is ``(G + μI)⁻¹`` up to the factor ``λ_s + μ`` on the sketched subspace and the
identity on its complement: the conjugate inner iterations of :mod:`curveball._inner_loop`
then see the top of the spectrum flattened, as in NNCG for physics-informed networks
(Rathore, Lei, Frangella, Lu & Udell, ICML 2024). The overall scale of ``P`` is irrelevant
to the 2×2 solve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from curveball._gauss_newton import RELATIVE_FLOOR
from curveball._param_vectors import real_view

RANK = 64
"""The default number of products in the sketch (the preconditioner's rank)."""


def _flat(vector: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([real_view(v).reshape(-1) for v in vector]).double()


def _shaped(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for piece, v in zip(torch.split(flat, [real_view(v).numel() for v in like]), like, strict=True):
        view = real_view(v)
        x = piece.view(view.shape).to(view.dtype)
        out.append(torch.view_as_complex(x) if v.is_complex() else x)
    return out


def sketch(
    product: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    like: Sequence[torch.Tensor],
    rank: int,
    generator: torch.Generator | None = None,
    columns_product: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Ω, G Ω)`` (float64, ``D × s``) for ``s = min(rank, D)`` Gaussian columns, with
    ``product`` the Gauss-Newton-vector product on parameter-shaped lists, one column at a
    time, or ``columns_product`` (``Ω ↦ G Ω`` on the ``D × s`` matrix, all columns at once:
    where ``J`` is at hand, ``Jᵀ H_L (J Ω)`` is two matrix products)."""
    size = sum(real_view(v).numel() for v in like)
    columns = min(rank, size)
    omega = torch.randn(size, columns, dtype=torch.float64, generator=generator)
    omega = torch.linalg.qr(omega).Q  # orthonormal columns: a better conditioned ΩᵀY
    device_omega = omega.to(like[0].device)
    if columns_product is not None:
        return device_omega, columns_product(device_omega).double()
    images = [_flat(product(_shaped(device_omega[:, j], like))) for j in range(columns)]
    return device_omega, torch.stack(images, dim=1)


class NystromInverse:
    """The preconditioner of the module docstring from a sketch ``(Ω, Y = G Ω)``."""

    def __init__(self, omega: torch.Tensor, images: torch.Tensor) -> None:
        shift = torch.finfo(torch.float64).eps * float(torch.linalg.matrix_norm(images, 2))
        shifted = images + shift * omega
        core = omega.T @ shifted
        factor = torch.linalg.cholesky(0.5 * (core + core.T))
        b = torch.linalg.solve_triangular(factor, shifted.T, upper=False).T  # Y_ν C⁻ᵀ
        self.basis, singular, _ = torch.linalg.svd(b, full_matrices=False)
        self.values = (singular**2 - shift).clamp_min(0.0)

    def apply(self, vector: Sequence[torch.Tensor], damping: float) -> list[torch.Tensor]:
        """``P v`` for ``v`` one tensor per parameter (``damping`` is μ)."""
        x = _flat(vector).to(self.basis.device)
        coefficients = self.basis.T @ x
        top = float(self.values[0]) if self.values.numel() else 0.0
        damping = max(damping, RELATIVE_FLOOR * top)  # bounded at λ = 0
        smallest = float(self.values[-1]) if self.values.numel() else 0.0
        scale = (smallest + damping) / (self.values + damping)
        out = x + self.basis @ ((scale - 1.0) * coefficients)
        return _shaped(out, vector)
