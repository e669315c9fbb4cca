"""Hessian-free optimisation (Martens, "Deep learning via Hessian-free optimization", ICML
2010), a baseline for the PINN race, for any loss of the form L(θ) = ½‖r(θ)‖².

Per step it minimises the damped Gauss-Newton model of L,

    q(d) = L + gᵀd + ½ dᵀ(G + λI)d,   g = Jᵀr,  G = JᵀJ,  J = ∂r/∂θ,

by truncated conjugate gradients on matrix-vector products with G (never forming it),
warm-started from the previous step's solution, then adapts λ by the reduction ratio
(Levenberg-Marquardt) and backtracks along d.

The pieces: :class:`GaussNewtonProducts` (Jv, Jᵀu and Gv by reverse mode only, from a
residual vector that autograd can differentiate: the user's way, ``autograd.grad`` on the
inputs included), :func:`conjugate_gradient`, :func:`adapted_damping`, and the optimizer
:class:`HessianFree`. It knows nothing of PDEs: it takes the residual as a closure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from benchmarks.line_search import backtracking_line_search, loss_along


# ------------------------------------------------------------------------------ curvature
def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _split(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [
        c.view_as(p) for c, p in zip(vector.split([p.numel() for p in like]), like, strict=True)
    ]


class GaussNewtonProducts:
    """Products with J = ∂r/∂θ and G = JᵀJ at one θ, on flat D-vectors, by reverse mode.

    Jᵀu is a vector-Jacobian product of r; Jv comes from the double-vjp trick: with
    h(u) = Jᵀu (linear in u, built once with ``create_graph=True``), Jv = ∂(hᵀv)/∂u, one
    more backward pass. So Gv = Jᵀ(Jv) costs two backward passes and works for any r
    autograd can differentiate twice, including residuals that call ``autograd.grad``.

    Args:
        residual: r(θ), an N-vector with its graph to ``params``.
        params: θ.
    """

    def __init__(self, residual: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        self.residual, self.params = residual, list(params)
        self._u = torch.zeros_like(residual, requires_grad=True)
        transposed = torch.autograd.grad(
            residual, self.params, self._u, create_graph=True, allow_unused=True
        )
        self._transposed = [
            torch.zeros_like(p) if t is None else t
            for t, p in zip(transposed, self.params, strict=True)
        ]

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        """Jᵀu (a D-vector)."""
        grads = torch.autograd.grad(
            self.residual, self.params, u, retain_graph=True, allow_unused=True
        )
        grads = [
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params, strict=True)
        ]
        return _flat(grads)

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """Jv (an N-vector), as ∂(Jᵀu)ᵀv/∂u."""
        (jv,) = torch.autograd.grad(
            self._transposed, self._u, _split(v, self.params), retain_graph=True
        )
        return jv

    def gradient(self) -> torch.Tensor:
        """g = Jᵀr, the gradient of L = ½‖r‖²."""
        return self.vjp(self.residual.detach())

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """Gv = Jᵀ(Jv)."""
        return self.vjp(self.jvp(v))


# ------------------------------------------------------------------------------ the solver
@dataclass
class CGResult:
    """The outcome of :func:`conjugate_gradient`: the iterate, the iterations run, the
    final relative residual ‖b − Ax‖/‖b‖ and the quadratic's value φ(x) = ½xᵀAx − bᵀx."""

    x: torch.Tensor
    iterations: int
    relative_residual: float
    value: float


def _progress_stalled(values: list[float], eps: float) -> bool:
    """Martens' (2010, §4.4) test: over the last k = max(10, 0.1 i) iterations φ decreased
    by less than a fraction k·eps of its value, (φᵢ − φᵢ₋ₖ)/φᵢ < k·eps with φᵢ < 0."""
    i = len(values) - 1
    k = max(10, int(0.1 * i))
    if eps <= 0 or i <= k or values[-1] >= 0:
        return False
    return (values[-1] - values[-1 - k]) / values[-1] < k * eps


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    max_iter: int = 250,
    tol: float = 1e-10,
    progress_eps: float = 5e-4,
) -> CGResult:
    """Solve Ax = b for a symmetric positive definite A by conjugate gradients (Hestenes &
    Stiefel 1952; Nocedal & Wright, Alg. 5.2), truncated.

    Stops after ``max_iter`` iterations, when ‖b − Ax‖ ≤ tol·‖b‖, or when Martens' relative
    progress test on φ(x) = ½xᵀAx − bᵀx fires (``progress_eps`` = 0 turns it off). Each
    iteration costs one product with A.
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    residual = b - matvec(x) if x0 is not None else b.clone()
    p, rr = residual.clone(), residual.dot(residual)
    b_norm = float(b.norm()) or 1.0
    values = [float(-0.5 * x.dot(b + residual))]
    i = 0
    while i < max_iter and float(rr.sqrt()) > tol * b_norm:
        ap = matvec(p)
        alpha = rr / p.dot(ap)
        x.add_(p, alpha=float(alpha))
        residual.sub_(ap, alpha=float(alpha))
        rr_new = residual.dot(residual)
        p = residual + (rr_new / rr) * p
        rr, i = rr_new, i + 1
        values.append(float(-0.5 * x.dot(b + residual)))
        if _progress_stalled(values, progress_eps):
            break
    return CGResult(x, i, float(rr.sqrt()) / b_norm, values[-1])


def reduction_ratio(actual: float, predicted: float) -> float:
    """ρ = (L(θ + d) − L(θ)) / (q(d) − q(0)), the measured over the predicted change, with q
    the undamped Gauss-Newton model (Martens 2010, §4.1); nan when the model predicts no
    decrease (then λ grows)."""
    return actual / predicted if predicted < 0 else math.nan


def adapted_damping(
    damping: float, ratio: float, factor: float = 2 / 3, low: float = 0.25, high: float = 0.75
) -> float:
    """The Levenberg-Marquardt rule (Martens 2010, §4.1): λ·factor when ρ > high, λ/factor
    when ρ < low (or ρ is not finite), else λ."""
    if math.isnan(ratio) or ratio < low:
        return damping / factor
    return damping * factor if ratio > high else damping


# ------------------------------------------------------------------------------ the optimizer
class HessianFree(torch.optim.Optimizer):
    """Hessian-free optimisation with Gauss-Newton curvature (Martens, ICML 2010).

    For L(θ) = ½‖r(θ)‖², per step::

        g ← Jᵀr;  solve (G + λI) d = −g by CG from x₀ = ζ·d_prev, ≤ max_cg iterations
        ρ ← (L(θ + d) − L(θ)) / (gᵀd + ½‖Jd‖²)      (the reduction ratio)
        λ ← λ·2/3 if ρ > 3/4;  λ·3/2 if ρ < 1/4
        η ← Armijo backtracking from 1 (×0.8);  θ ← θ + η d;  d_prev ← d

    Args:
        params: the parameters.
        damping: the initial λ > 0.
        adapt_damping: adapt λ by ρ (else keep it fixed).
        max_cg: the cap on CG iterations per step.
        cg_tol: CG's relative residual tolerance.
        cg_progress: ε of Martens' relative-progress stopping test for CG (0: off).
        warm_start: ζ ∈ [0, 1], the decay of the previous solution CG starts from.
        damping_bounds: λ is kept in ``[low, high]``.

    After each step ``self.last`` holds the loss before it, λ, ρ, the CG iterations and the
    step size.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        damping: float = 1.0,
        adapt_damping: bool = True,
        max_cg: int = 250,
        cg_tol: float = 1e-10,
        cg_progress: float = 5e-4,
        warm_start: float = 0.95,
        damping_bounds: tuple[float, float] = (1e-12, 1e12),
    ) -> None:
        if damping <= 0:
            raise ValueError(f"damping: expected λ > 0, got {damping}")
        if max_cg < 1:
            raise ValueError(f"max_cg: expected at least 1 iteration, got {max_cg}")
        if not 0 <= warm_start <= 1:
            raise ValueError(f"warm_start: expected ζ in [0, 1], got {warm_start}")
        defaults = {
            "damping": damping,
            "adapt_damping": adapt_damping,
            "max_cg": max_cg,
            "cg_tol": cg_tol,
            "cg_progress": cg_progress,
            "warm_start": warm_start,
            "damping_bounds": damping_bounds,
        }
        super().__init__(params, defaults)
        self.last: dict[str, float] = {}

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _global(self) -> dict:
        """The step's global state (λ), kept with the first parameter as LBFGS does."""
        state = self.state[self._params()[0]]
        state.setdefault("lambda", self.param_groups[0]["damping"])
        return state

    def _warm_start(self) -> torch.Tensor | None:
        params, zeta = self._params(), self.param_groups[0]["warm_start"]
        if "direction" not in self.state[params[-1]] or zeta == 0:
            return None
        return zeta * _flat([self.state[p]["direction"] for p in params])

    def _solve(self, products: GaussNewtonProducts, g: torch.Tensor, damping: float):
        group = self.param_groups[0]
        return conjugate_gradient(
            lambda v: products(v) + damping * v,
            -g,
            self._warm_start(),
            group["max_cg"],
            group["cg_tol"],
            group["cg_progress"],
        )

    def step(self, residual_fn: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        """One Hessian-free step.

        Args:
            residual_fn: r at the parameters' current values, differentiable in them (the
                line search calls it again after writing each trial θ + η d).

        Returns:
            L = ½‖r‖² before the step, detached.
        """
        params, state = self._params(), self._global()
        with torch.enable_grad():
            residual = residual_fn()
            products = GaussNewtonProducts(residual, params)
            loss = 0.5 * residual.detach().square().sum()
            g = products.gradient()
            cg = self._solve(products, g, state["lambda"])
            predicted = g.dot(cg.x) + 0.5 * products.jvp(cg.x).square().sum()
            del products, residual
            direction = _split(cg.x, params)
            eta, after, full = self._line_search(params, direction, residual_fn, loss, g.dot(cg.x))
        ratio = reduction_ratio(float(full - loss), float(predicted))
        self._update(state, params, direction, ratio)
        self.last = {
            "loss": float(loss),
            "lambda": state["lambda"],
            "ratio": ratio,
            "cg_iterations": cg.iterations,
            "step_size": eta,
            "loss_after": float(after),
        }
        return loss

    @staticmethod
    def _line_search(params, direction, residual_fn, loss, slope):
        """Backtrack from η = 1 and move there; also returns L(θ + d), the first trial."""
        loss_at, accept = loss_along(
            params, direction, lambda: 0.5 * residual_fn().detach().square().sum()
        )
        trials: dict[float, torch.Tensor] = {}

        def recorded(eta: float) -> torch.Tensor:
            trials[eta] = loss_at(eta)
            return trials[eta]

        eta, after = backtracking_line_search(recorded, loss, slope)
        accept(eta)
        return eta, after, trials[1.0]

    def _update(self, state, params, direction, ratio: float) -> None:
        group = self.param_groups[0]
        for p, d in zip(params, direction, strict=True):
            self.state[p]["direction"] = d.detach()
        if group["adapt_damping"]:
            low, high = group["damping_bounds"]
            state["lambda"] = min(high, max(low, adapted_damping(state["lambda"], ratio)))
