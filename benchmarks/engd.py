"""Energy natural gradient descent (ENGD; Müller & Zeinhofer, ICML 2023, arXiv:2302.13163),
a baseline for the PINN race, for any loss of the form L(θ) = ½‖r(θ)‖².

For such a loss the energy Gramian is the Gauss-Newton matrix G = JᵀJ of the residual's
Jacobian J = ∂r/∂θ (N × D), and ENGD steps along the natural gradient G⁺∇L, ∇L = Jᵀr,
with a grid line search over the step size. Two ways to compute the direction:

* ``"gramian"`` (the paper's): the D × D Gramian, ``d = −(JᵀJ + δI)⁺ Jᵀr`` by least squares;
* ``"woodbury"`` (the kernel form; Guzmán-Cordero et al., arXiv:2505.12149): the N × N
  kernel, ``d = −Jᵀ(JJᵀ + δI)⁻¹ r``, equal to the first for δ > 0 by the push-through
  identity (JᵀJ + δI)⁻¹Jᵀ = Jᵀ(JJᵀ + δI)⁻¹, and cheaper when N < D.

The optimizer knows nothing of PDEs: it takes the residual and its Jacobian as closures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from benchmarks.line_search import grid_line_search, loss_along, step_size_grid

FORMS = ("gramian", "woodbury")


# ------------------------------------------------------------------------------ the maths
def gramian(jacobian: torch.Tensor) -> torch.Tensor:
    """G = JᵀJ (D × D), the Gauss-Newton matrix of ½‖r‖² and ENGD's energy Gramian."""
    return jacobian.T @ jacobian


def solve_psd(matrix: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """x = (A + δI)⁺ b for a symmetric positive semi-definite A, by least squares.

    On the CPU ``torch.linalg.lstsq`` with the SVD driver (``gelsd``; singular values below
    ``eps · n`` of the largest are cut, as ENGD's reference uses ``lstsq``); on other devices,
    where ``lstsq`` assumes full rank, the Hermitian pseudo-inverse."""
    damped = matrix + damping * torch.eye(len(matrix), dtype=matrix.dtype, device=matrix.device)
    if damped.device.type == "cpu":
        return torch.linalg.lstsq(damped, rhs.unsqueeze(-1), driver="gelsd").solution[:, 0]
    return torch.linalg.pinv(damped, hermitian=True) @ rhs


def solve_pd(matrix: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """x = (A + δI)⁻¹ b by Cholesky, falling back to :func:`solve_psd` when A + δI is not
    numerically positive definite."""
    damped = matrix + damping * torch.eye(len(matrix), dtype=matrix.dtype, device=matrix.device)
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        return solve_psd(matrix, rhs, damping)
    return torch.cholesky_solve(rhs.unsqueeze(-1), factor)[:, 0]


def natural_gradient(
    jacobian: torch.Tensor, residual: torch.Tensor, damping: float = 0.0
) -> torch.Tensor:
    """The ENGD direction from the Gramian, d = −(JᵀJ + δI)⁺ Jᵀr (a D-vector)."""
    return -solve_psd(gramian(jacobian), jacobian.T @ residual, damping)


def woodbury_natural_gradient(
    jacobian: torch.Tensor, residual: torch.Tensor, damping: float
) -> torch.Tensor:
    """The ENGD direction from the kernel, d = −Jᵀ(JJᵀ + δI)⁻¹ r (an N × N solve)."""
    return -jacobian.T @ solve_pd(jacobian @ jacobian.T, residual, damping)


def _split(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A flat vector cut into tensors shaped like ``like``."""
    return [
        c.view_as(p) for c, p in zip(vector.split([p.numel() for p in like]), like, strict=True)
    ]


# ------------------------------------------------------------------------------ the optimizer
class ENGD(torch.optim.Optimizer):
    """Energy natural gradient descent with a grid line search (Müller & Zeinhofer, 2023).

    For L(θ) = ½‖r(θ)‖², per step::

        r, J ← r(θ), ∂r/∂θ                        (jacobian_fn)
        d    ← −(JᵀJ + δI)⁺ Jᵀ r                  (form="gramian")
             or −Jᵀ (JJᵀ + δI)⁻¹ r                (form="woodbury")
        η    ← argmin_{η ∈ {2⁻ᵏ: k = 0..K}} L(θ + η d)   (no move if none decreases L)
        θ    ← θ + η d

    Args:
        params: the parameters (their order is that of J's columns).
        damping: δ ≥ 0 (Dangel et al.'s best runs: 1e-10); the Woodbury form needs δ > 0
            when N > D, or falls back to least squares.
        form: ``"gramian"`` (D × D) or ``"woodbury"`` (N × N).
        grid: the line search's step sizes (default 2⁻ᵏ, k = 0..30).

    After each step ``self.last`` holds the loss before it, the step size and the loss after.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        damping: float = 1e-10,
        form: str = "gramian",
        grid: Sequence[float] | None = None,
    ) -> None:
        if damping < 0:
            raise ValueError(f"damping: expected δ ≥ 0, got {damping}")
        if form not in FORMS:
            raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
        grid = tuple(step_size_grid() if grid is None else grid)
        if not grid or min(grid) <= 0:
            raise ValueError(f"grid: expected positive step sizes, got {grid}")
        super().__init__(params, {"damping": damping, "form": form, "grid": grid})
        self.last: dict[str, float] = {}

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def direction(self, residual: torch.Tensor, jacobian: torch.Tensor) -> list[torch.Tensor]:
        """The natural-gradient direction d, shaped like the parameters."""
        group = self.param_groups[0]
        solve = natural_gradient if group["form"] == "gramian" else woodbury_natural_gradient
        return _split(solve(jacobian, residual, group["damping"]), self._params())

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        residual_fn: Callable[[], torch.Tensor],
        jacobian_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """One ENGD step.

        Args:
            residual_fn: r at the parameters' current values (the line search calls it
                after writing each trial θ + η d into the parameters).
            jacobian_fn: ``(r, J)`` at the current parameters, J of shape ``N × D``.

        Returns:
            L = ½‖r‖² before the step.
        """
        residual, jacobian = jacobian_fn()
        loss = 0.5 * residual.square().sum()
        direction = self.direction(residual, jacobian)
        params = self._params()
        with torch.enable_grad():  # residual_fn may differentiate with respect to inputs
            loss_at, accept = loss_along(
                params, direction, lambda: 0.5 * residual_fn().square().sum()
            )
            eta, after = grid_line_search(loss_at, self.param_groups[0]["grid"], loss)
        accept(eta)
        self.last = {"loss": float(loss), "step_size": eta, "loss_after": float(after)}
        return loss
