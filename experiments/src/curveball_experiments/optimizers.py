"""Baseline optimizers that the experiments compare CurveBall against.

Every optimizer used by the experiments is driven through one small interface,
:class:`Stepper`: ``step(model_fn, loss_fn)`` runs one iteration and returns the
loss measured before the update (a detached tensor). This file holds

* :class:`GradientStepper`: any first-order ``torch.optim`` optimizer (SGD with
  momentum, Adam) behind that interface;
* :class:`LBFGSStepper`: ``torch.optim.LBFGS``, one quasi-Newton iteration (with a
  strong-Wolfe line search) per ``step``;
* :class:`LevenbergMarquardt`: exact damped Gauss-Newton on a residual vector, with a
  dense Jacobian (``torch.func.jacrev``) and the usual gain-ratio rule for the damping;
* :class:`CurveBallStepper`: the library's ``CurveBall`` behind the same interface;
* :class:`GridSGD` and :class:`GridAdam`: the update rules of ``torch.optim.SGD`` and
  ``torch.optim.Adam`` applied to many independent copies of a small problem at once,
  each copy with its own learning rate. They make a learning-rate grid search over
  many seeds affordable on a CPU; the tests check them against ``torch.optim``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

ModelFn = Callable[[], Tensor]
LossFn = Callable[[Tensor], Tensor]

SGD_MOMENTUM = 0.9
"""Momentum of the SGD baseline everywhere."""

DEFAULT_LR = {"SGD": 0.01, "Adam": 1e-3}
"""Learning rates of the first-order baselines on the networks (common defaults)."""


def lr_grid(low_exponent: int = -5, high_exponent: int = 0, half_steps: bool = True) -> list[float]:
    """Learning rates ``10^k`` for ``k`` from ``low_exponent`` to ``high_exponent``.

    With ``half_steps`` the grid also holds ``10^(k + 1/2)`` between two powers of ten.
    """
    step = 0.5 if half_steps else 1.0
    count = round((high_exponent - low_exponent) / step) + 1
    return [10.0 ** (low_exponent + i * step) for i in range(count)]


class Stepper(Protocol):
    """One optimizer, driven one iteration at a time."""

    def step(self, model_fn: ModelFn, loss_fn: LossFn) -> Tensor:
        """Run one iteration; return the loss before the update (detached)."""
        ...


class GradientStepper:
    """A first-order ``torch.optim`` optimizer behind the :class:`Stepper` interface."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self, model_fn: ModelFn, loss_fn: LossFn) -> Tensor:
        """Forward, backward and one ``optimizer.step()``."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model_fn())
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def sgd(params: Any, lr: float = DEFAULT_LR["SGD"]) -> GradientStepper:
    """SGD with momentum 0.9 (``torch.optim.SGD``)."""
    return GradientStepper(torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM))


def adam(params: Any, lr: float = DEFAULT_LR["Adam"]) -> GradientStepper:
    """Adam with the usual betas (0.9, 0.999) and eps 1e-8 (``torch.optim.Adam``)."""
    return GradientStepper(torch.optim.Adam(params, lr=lr))


class LBFGSStepper:
    """``torch.optim.LBFGS`` with one quasi-Newton iteration per :meth:`step`.

    ``max_iter=1`` makes one ``optimizer.step(closure)`` one iteration (one search
    direction followed by a strong-Wolfe line search of at most ``max_eval``
    function evaluations), so iterations are counted like every other method's.
    """

    def __init__(
        self, params: Any, lr: float = 1.0, history_size: int = 10, max_eval: int = 20
    ) -> None:
        self.optimizer = torch.optim.LBFGS(
            params,
            lr=lr,
            max_iter=1,
            max_eval=max_eval,
            history_size=history_size,
            line_search_fn="strong_wolfe",
        )

    def step(self, model_fn: ModelFn, loss_fn: LossFn) -> Tensor:
        """One L-BFGS iteration on the current mini-batch."""

        def closure() -> Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model_fn())
            loss.backward()
            return loss

        return self.optimizer.step(closure).detach()


class _CallModel(nn.Module):
    """Holds ``module`` as a submodule and calls an arbitrary closure over it.

    ``torch.func.functional_call`` on this wrapper swaps the parameters of the wrapped
    module for the duration of the call, so a closure such as ``lambda: module(x)``
    becomes a function of the parameters.
    """

    def __init__(self, module: nn.Module, fn: ModelFn) -> None:
        super().__init__()
        self.inner = module
        self.fn = fn

    def forward(self) -> Tensor:
        return self.fn()


class LevenbergMarquardt:
    """Exact damped Gauss-Newton (Levenberg-Marquardt) on a residual vector.

    ``model_fn()`` must return the residuals ``r`` and the loss must be a multiple of
    ``sum(r**2)``. Each iteration builds the dense Jacobian ``J = dr/dw`` and solves::

        (JᵀJ + μ I) δ = -Jᵀ r

    The trial point ``w + δ`` is accepted when the gain ratio
    ``ρ = (½|r|² - ½|r(w+δ)|²) / (½ δᵀ(μ δ - Jᵀr))`` is positive, and then
    ``μ ← μ · max(1/3, 1 - (2ρ - 1)³)``, ``ν ← 2``; otherwise the step is rejected and
    ``μ ← μ ν``, ``ν ← 2ν`` (Nielsen's rule; Madsen, Nielsen and Tingleff, "Methods
    for non-linear least squares problems", 2004). A rejected trial still counts as
    one iteration. ``μ`` starts at ``tau · max(diag(JᵀJ))`` unless given.

    Args:
        module: the model; all its parameters that require a gradient are optimised.
        mu: initial damping (``None``: from ``tau``).
        tau: relative initial damping.
        min_mu: lower bound for ``μ``.
    """

    def __init__(
        self, module: nn.Module, mu: float | None = None, tau: float = 1e-3, min_mu: float = 1e-12
    ) -> None:
        if mu is not None and mu <= 0:
            raise ValueError(f"Invalid initial damping: {mu}")
        if tau <= 0:
            raise ValueError(f"Invalid tau: {tau}")
        self.module = module
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.mu = mu
        self.tau = tau
        self.min_mu = min_mu
        self.nu = 2.0
        self.accepted = 0
        self.rejected = 0

    def step(self, model_fn: ModelFn, loss_fn: LossFn) -> Tensor:
        """One damped Gauss-Newton iteration; returns ``loss_fn(r)`` at the start."""
        wrapper = _CallModel(self.module, model_fn)
        current = {f"inner.{n}": p.detach() for n, p in self.named}

        def residuals(params: dict[str, Tensor]) -> Tensor:
            return torch.func.functional_call(wrapper, params, ()).reshape(-1)

        with torch.no_grad():
            r = residuals(current)
            loss = loss_fn(r.detach())
        jac = torch.func.jacrev(residuals)(current)
        jacobian = torch.cat([jac[k].reshape(r.numel(), -1) for k in current], dim=1)
        gradient = jacobian.T @ r
        gauss_newton = jacobian.T @ jacobian
        if self.mu is None:
            self.mu = max(self.tau * float(gauss_newton.diagonal().max()), self.min_mu)
        eye = torch.eye(gauss_newton.shape[0], dtype=r.dtype, device=r.device)
        delta, info = torch.linalg.solve_ex(gauss_newton + self.mu * eye, -gradient)
        accepted = False
        if int(info) == 0 and bool(torch.isfinite(delta).all()):
            predicted = 0.5 * float(delta @ (self.mu * delta - gradient))
            trial = {}
            offset = 0
            for k, value in current.items():
                n = value.numel()
                trial[k] = value + delta[offset : offset + n].view_as(value)
                offset += n
            with torch.no_grad():
                r_new = residuals(trial)
            actual = 0.5 * float(r @ r - r_new @ r_new)
            ratio = actual / predicted if predicted > 0 else -1.0
            if math.isfinite(ratio) and ratio > 0:
                accepted = True
                with torch.no_grad():
                    for (_, p), k in zip(self.named, trial, strict=True):
                        p.copy_(trial[k])
                self.mu = max(self.mu * max(1.0 / 3.0, 1.0 - (2.0 * ratio - 1.0) ** 3), self.min_mu)
                self.nu = 2.0
        if accepted:
            self.accepted += 1
        else:
            self.rejected += 1
            self.mu *= self.nu
            self.nu *= 2.0
        return loss.detach()


class CurveBallStepper:
    """The library's ``CurveBall`` optimizer behind the :class:`Stepper` interface."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def step(self, model_fn: ModelFn, loss_fn: LossFn) -> Tensor:
        """One CurveBall iteration."""
        loss, _ = self.optimizer.step(model_fn, loss_fn)
        return loss.detach()


CURVEBALL_OPTIONS: dict[str, Any] = {}
"""Constructor keywords for every CurveBall of a run (empty: the defaults); set by the
command line's ``--curveball KEY=VALUE``."""


def curveball(module: nn.Module) -> CurveBallStepper:
    """CurveBall on ``module`` at its default settings, or with :data:`CURVEBALL_OPTIONS`."""
    from curveball import CurveBall

    return CurveBallStepper(CurveBall(module, **CURVEBALL_OPTIONS))


def curveball_description() -> str:
    """How CurveBall is set up in this run, for the reports."""
    import inspect

    from curveball import PAPER_DEFAULTS, CurveBall

    defaults = inspect.signature(CurveBall).parameters
    if PAPER_DEFAULTS.keys() <= CURVEBALL_OPTIONS.keys():  # --paper
        text = "the paper's settings (curveball.PAPER_DEFAULTS)"
        changed = {
            k: v
            for k, v in CURVEBALL_OPTIONS.items()
            if k not in PAPER_DEFAULTS or PAPER_DEFAULTS[k] != v
        }
    else:
        # lr, and every default that is not the paper's
        shown = ["lr"] + [k for k, v in PAPER_DEFAULTS.items() if defaults[k].default != v]
        text = ", ".join(f"{k}={defaults[k].default!r}" for k in shown)
        text = f"defaults ({text}, automatic rho and beta)"
        changed = CURVEBALL_OPTIONS
    if not changed:
        return text
    return text + " except " + ", ".join(f"{k}={v!r}" for k, v in changed.items())


class GridSGD:
    """``torch.optim.SGD`` (momentum, no dampening, no Nesterov) on many copies at once.

    ``params`` are tensors whose leading dimensions index independent copies of a
    problem; ``lr`` is a tensor that broadcasts against them (one rate per copy).
    The arithmetic follows ``torch.optim.SGD``: ``b ← m b + g`` (``b = g`` at the first
    step), ``w ← w - lr b``.
    """

    def __init__(self, params: Sequence[Tensor], lr: Tensor, momentum: float = SGD_MOMENTUM):
        self.params = list(params)
        self.lr = lr
        self.momentum = momentum
        self.buffers: list[Tensor] | None = None

    @torch.no_grad()
    def update(self, grads: Sequence[Tensor]) -> None:
        """Apply one update with the given gradients."""
        if self.buffers is None:
            self.buffers = [g.clone() for g in grads]
        else:
            for b, g in zip(self.buffers, grads, strict=True):
                b.mul_(self.momentum).add_(g)
        for p, b in zip(self.params, self.buffers, strict=True):
            p.sub_(self.lr * b)


class GridAdam:
    """``torch.optim.Adam`` (no AMSGrad, no weight decay) on many copies at once.

    Same conventions as :class:`GridSGD`. The arithmetic follows ``torch.optim.Adam``:
    ``m ← β1 m + (1-β1) g``, ``v ← β2 v + (1-β2) g²``,
    ``w ← w - lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)``.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        lr: Tensor,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = list(params)
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def update(self, grads: Sequence[Tensor]) -> None:
        """Apply one update with the given gradients."""
        beta1, beta2 = self.betas
        self.t += 1
        correction1 = 1.0 - beta1**self.t
        correction2_sqrt = math.sqrt(1.0 - beta2**self.t)
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m.lerp_(g, 1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = (v.sqrt() / correction2_sqrt).add_(self.eps)
            p.sub_((self.lr / correction1) * m / denom)


GRID_RULES: dict[str, type[GridSGD] | type[GridAdam]] = {"SGD": GridSGD, "Adam": GridAdam}
"""The batched update rule that mirrors each tuned first-order baseline."""
