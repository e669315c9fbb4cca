"""The CurveBall optimizer (Henriques et al., ICCV 2019, arXiv:1805.08095)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from curveball.curvature.double_backward import DoubleBackwardEngine, DoubleBackwardUnsupported
from curveball.curvature.engine import JacobianEngine
from curveball.curvature.forward_mode import ForwardModeEngine, ForwardModeUnsupported
from curveball.curvature.substitution import ModuleTensors
from curveball.damping import adjust_damping, trust_ratio
from curveball.distributed import Averager
from curveball.losses import LossDerivatives
from curveball.space import ParamSpace, dot
from curveball.step_sizes import StepSizes, solve_step_sizes

_MODES = ("auto", "forward", "double-backward")


@dataclass(frozen=True)
class StepInfo:
    """What one :meth:`CurveBall.step` did, for logging (``optimizer.last``).

    Attributes:
        step: the step number (1 for the first step).
        loss: the loss at the parameters before the step.
        rho: the momentum ρ used for ``z ← ρ z − β Δz``.
        beta: the step β.
        lambd: the damping λ the step was computed with.
        next_lambd: the damping after the step's trust-region update.
        predicted_change: the quadratic model's predicted loss change ``M(z')``.
        trust_ratio: actual over predicted change, when it was measured (else ``None``).
        refreshed: whether ρ and β were solved for at this step (else reused).
        skipped: whether the step was skipped because of a non-finite value.
        reason: what was non-finite, when skipped.
    """

    step: int
    loss: float
    rho: float
    beta: float
    lambd: float
    next_lambd: float
    predicted_change: float
    trust_ratio: float | None = None
    refreshed: bool = True
    skipped: bool = False
    reason: str | None = None


class CurveBall(torch.optim.Optimizer):
    r"""CurveBall: a minimal Newton solver interleaved with the parameter updates.

    From "Small steps and giant leaps: Minimal Newton solvers for Deep Learning",
    J. F. Henriques, S. Ehrhardt, S. Albanie, A. Vedaldi, ICCV 2019
    (arXiv:1805.08095). With ``J`` the Jacobian of the predictions ``y``,
    ``J_L``/``H_L`` the gradient/Hessian of the loss in ``y``, ``G = Jᵀ H_L J``
    and weight decay ``κ``, each step does::

        y, J z   ← one forward pass carrying the tangent z        (forward-mode AD)
        Δz       ← Jᵀ(H_L J z + J_L) + κ w + (λ + κ) z             (one backward pass)
        J Δz     ← one more forward-mode pass
        β, −ρ    ← argmin of the model over span{z, Δz} (2×2 system, float64)
        z        ← ρ z − β Δz
        w        ← w + α z
        every T steps: r = (L(w_new) − L(w_old)) / M(z');
                       λ ← λ / ω if r < r_low,  λ ← λ ω if r > r_high,  ω = factor^T

    Args:
        params: an ``nn.Module`` (fast path: true forward-mode AD), or an
            iterable of parameters or of parameter-group dicts (then pass
            ``model=`` for the fast path; without it the slower double-backward
            path is used).
        lr: α, scales the parameter step (per group; schedulers work as usual).
        momentum: ρ; ``None`` chooses it automatically at every step.
        beta: β; ``None`` chooses it automatically at every step.
        lambd: the initial damping λ ≥ 0.
        auto_lambda: adapt λ with the trust-region rule.
        lambda_factor: the per-step factor of the rule, in (0, 1];
            ``ω = lambda_factor ** lambda_interval``.
        lambda_thresholds: ``(low, high)`` trust-ratio thresholds, ``low < high``.
        lambda_interval: T, the number of steps between trust-region tests.
        weight_decay: κ, L2 penalty ``½ κ ‖w‖²`` (per group), entering both the
            gradient and the curvature.
        model: the module owning the parameters, when ``params`` are not a module.
        step_size_interval: solve for ρ and β every this many steps only, and
            reuse the last values in between (skipping the second forward-mode
            pass there). Steps with a trust-region test always solve.
        forward_mode: ``"auto"`` (forward-mode AD, falling back to double
            backward with one warning for operations without a forward-mode
            formula), ``"forward"`` (never fall back) or ``"double-backward"``.
        process_group: the ``torch.distributed`` group to average over; by default
            the default group when ``torch.distributed`` is initialised.

    Use::

        optimizer = CurveBall(model)
        loss, predictions = optimizer.step(lambda: model(x), lambda y: F.cross_entropy(y, t))

    After each step, ``optimizer.last`` is a :class:`StepInfo`. The running
    estimate ``z`` of parameter ``p`` is ``optimizer.state[p]["z"]``.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        momentum: float | None = None,
        beta: float | None = None,
        lambd: float = 1.0,
        auto_lambda: bool = True,
        lambda_factor: float = 0.999,
        lambda_thresholds: tuple[float, float] = (0.5, 1.5),
        lambda_interval: int = 5,
        weight_decay: float = 0.0,
        *,
        model: nn.Module | None = None,
        step_size_interval: int = 1,
        forward_mode: str = "auto",
        process_group: Any = None,
    ) -> None:
        if isinstance(params, nn.parallel.DistributedDataParallel) or isinstance(
            model, nn.parallel.DistributedDataParallel
        ):
            raise TypeError(
                "params: CurveBall does its own gradient averaging and cannot use a "
                "DistributedDataParallel wrapper; pass the wrapped module (ddp.module) and, "
                "if needed, process_group=..."
            )
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError("model: given twice (as params and as model=)")
            model, params = params, params.parameters()
        if isinstance(params, torch.Tensor):
            raise TypeError("params: expected an nn.Module or an iterable of tensors, got a Tensor")
        if not lr >= 0.0 or not math.isfinite(lr):
            raise ValueError(f"lr: expected a finite value >= 0, got {lr}")
        if not lambd >= 0.0 or not math.isfinite(lambd):
            raise ValueError(f"lambd: expected a finite value >= 0, got {lambd}")
        if not 0.0 < lambda_factor <= 1.0:
            raise ValueError(f"lambda_factor: expected a value in (0, 1], got {lambda_factor}")
        if len(tuple(lambda_thresholds)) != 2 or not lambda_thresholds[0] < lambda_thresholds[1]:
            raise ValueError(
                f"lambda_thresholds: expected (low, high) with low < high, got {lambda_thresholds}"
            )
        for name, value in (
            ("lambda_interval", lambda_interval),
            ("step_size_interval", step_size_interval),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if not weight_decay >= 0.0 or not math.isfinite(weight_decay):
            raise ValueError(f"weight_decay: expected a finite value >= 0, got {weight_decay}")
        for name, value in (("momentum", momentum), ("beta", beta)):
            if value is not None and not math.isfinite(value):
                raise ValueError(
                    f"{name}: expected None (automatic) or a finite number, got {value}"
                )
        if forward_mode not in _MODES:
            raise ValueError(f"forward_mode: expected one of {_MODES}, got {forward_mode!r}")
        if forward_mode == "forward" and model is None:
            raise ValueError(
                "forward_mode='forward' needs the nn.Module: pass CurveBall(model) or model=..."
            )
        defaults = {"lr": lr, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.is_sparse or p.layout != torch.strided:
                    raise ValueError("params: sparse parameters are not supported")
                if p.is_complex():
                    raise ValueError("params: complex parameters are not supported")
                if not p.is_floating_point():
                    raise ValueError(f"params: expected floating-point parameters, got {p.dtype}")
            if group["lr"] < 0 or group["weight_decay"] < 0:
                raise ValueError("param group: lr and weight_decay must be >= 0")
        if not any(p.requires_grad for g in self.param_groups for p in g["params"]):
            raise ValueError("params: no trainable parameters (none has requires_grad=True)")

        self.model = model
        self.momentum = momentum
        self.beta = beta
        self.lambd = float(lambd)
        self.auto_lambda = auto_lambda
        self.lambda_factor = lambda_factor
        self.lambda_thresholds = (float(lambda_thresholds[0]), float(lambda_thresholds[1]))
        self.lambda_interval = lambda_interval
        self.step_size_interval = step_size_interval
        self.forward_mode = forward_mode
        self.averager = Averager(process_group)
        self.steps = 0
        self.last: StepInfo | None = None
        self._last_sizes: tuple[float, float] | None = None  # (rho, beta) for reuse
        self._layout_key: tuple[int, ...] | None = None
        self._zs: list[torch.Tensor] | None = None  # z, one tensor per trainable parameter
        self._fell_back = forward_mode == "double-backward" or model is None

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, including λ, the step count and the last ρ, β."""
        out = super().state_dict()
        out["curveball"] = {
            "lambd": self.lambd,
            "steps": self.steps,
            "last_sizes": self._last_sizes,
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("curveball", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.lambd = float(extra["lambd"])
            self.steps = int(extra["steps"])
            sizes = extra.get("last_sizes")
            self._last_sizes = None if sizes is None else (float(sizes[0]), float(sizes[1]))
        self._layout_key = None  # rebuild the layout around the loaded z

    # ---------------------------------------------------------------- layout
    def _trainable(self) -> tuple[list[torch.Tensor], list[int]]:
        params, groups = [], []
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    params.append(p)
                    groups.append(index)
        if not params:
            raise ValueError("params: no trainable parameters (none has requires_grad=True)")
        return params, groups

    def _prepare(self) -> list[torch.Tensor]:
        """(Re)build the layout and the engine when the trainable set changed; return z."""
        params, groups = self._trainable()
        key = tuple(id(p) for p in params)
        if key != self._layout_key:
            self._params, self._groups = params, groups
            # for each parameter group, the indices of its trainable parameters
            self._members = [
                [i for i, g in enumerate(groups) if g == index]
                for index in range(len(self.param_groups))
            ]
            self._space = ParamSpace(params, groups, len(self.param_groups))
            self._tensors = ModuleTensors(self.model, params) if self.model is not None else None
            self._engine = self._make_engine()
            self._layout_key = key
            self._zs = None
        if self._zs is None:
            self._zs = [self._z_for(p) for p in params]
        return self._zs

    def _z_for(self, p: torch.Tensor) -> torch.Tensor:
        """The z of ``p``, created at zero or re-laid out like ``p`` (a tangent must be)."""
        state = self.state[p]
        z = state.get("z")
        if z is None:
            z = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif not isinstance(z, torch.Tensor) or z.shape != p.shape:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(
                f"state_dict: z of a parameter of shape {tuple(p.shape)} has shape {got}"
            )
        elif z.stride() != p.stride() or z.dtype != p.dtype or z.device != p.device:
            z = torch.empty_like(p, memory_format=torch.preserve_format).copy_(z)
        state["z"] = z
        return z

    def _make_engine(self) -> JacobianEngine:
        if self._fell_back or self._tensors is None:
            return DoubleBackwardEngine(self._params, self._tensors)
        return ForwardModeEngine(self._params, self._tensors)

    # ------------------------------------------------------------------ step
    def _linearize(self, model_fn, zs, buffers_before, jvp_follows: bool):
        try:
            return self._engine.linearize(model_fn, zs, jvp_follows=jvp_follows)
        except ForwardModeUnsupported as error:
            if self.forward_mode == "forward":
                raise
            self._engine.abort()
            if buffers_before is not None:
                torch._foreach_copy_(self._tensors.current_buffers(), buffers_before)
            warnings.warn(
                "CurveBall: an operation in the model has no forward-mode derivative "
                f"({str(error).splitlines()[0]}); falling back to the slower double-backward "
                "Jacobian products for this optimizer",
                RuntimeWarning,
                stacklevel=3,
            )
            forward_engine = self._engine
            self._fell_back = True
            self._engine = self._make_engine()
            try:
                return self._engine.linearize(model_fn, zs, jvp_follows=jvp_follows)
            except DoubleBackwardUnsupported:
                # Neither path works (e.g. a torch.compile'd module): keep forward mode for
                # later calls, which may run a model that supports it.
                self._engine.abort()
                self._fell_back, self._engine = False, forward_engine
                raise

    def step(  # type: ignore[override]
        self,
        model_fn: Callable[[], torch.Tensor],
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One CurveBall iteration on the batch that ``model_fn`` evaluates.

        Args:
            model_fn: runs the model on the current batch, returns the predictions.
            loss_fn: maps the predictions to a scalar loss (mean over the batch).

        Returns:
            ``(loss, predictions)`` at the parameters before the step, detached.
        """
        if not callable(model_fn):
            raise TypeError(f"model_fn: expected a callable, got {type(model_fn).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        zs = self._prepare()
        params, space = self._params, self._space
        step = self.steps + 1
        lambd = self.lambd
        ws = [self.param_groups[g]["weight_decay"] for g in range(len(self.param_groups))]
        decayed = any(w > 0 for w in ws)
        buffers_before = None
        if self._tensors is not None and self._tensors.buffer_slots:
            buffers_before = [b.clone() for b in self._tensors.current_buffers()]

        auto_sizes = self.momentum is None or self.beta is None
        trial = self.auto_lambda and step % self.lambda_interval == 0
        refresh = trial or (
            auto_sizes and (self._last_sizes is None or (step - 1) % self.step_size_interval == 0)
        )
        try:
            y, jz = self._linearize(model_fn, zs, buffers_before, refresh)
            loss = LossDerivatives(loss_fn, y)
            j_loss = loss.grad.detach()
            h_jz = loss.hvp(jz)
            # Δz = Jᵀ(H_L J z + J_L) + κ w + (λ + κ) z
            dz = self._engine.vjp(h_jz + j_loss)
            space.mean_(dz, self.averager)
            for group, members in zip(self.param_groups, self._members, strict=True):
                factor = lambd + group["weight_decay"]
                if members and group["weight_decay"] > 0:
                    torch._foreach_add_(
                        [dz[i] for i in members],
                        [params[i].detach() for i in members],
                        alpha=group["weight_decay"],
                    )
                if members and factor != 0.0:
                    torch._foreach_add_(
                        [dz[i] for i in members], [zs[i] for i in members], alpha=factor
                    )

            # Data-dependent scalars (averaged over processes) ...
            data = [loss.loss.to(torch.float64), _finite_flag(y)]
            if refresh:
                jdz = self._engine.jvp(dz)
                h_jdz = loss.hvp(jdz)
                data += [
                    dot(jdz, h_jdz),  # (JΔz)ᵀ H_L (JΔz)
                    dot(jz, h_jdz),  # (Jz)ᵀ H_L (JΔz)
                    dot(jz, h_jz),  # (Jz)ᵀ H_L (Jz)
                    dot(j_loss, jdz),  # J_Lᵀ JΔz
                    dot(j_loss, jz),  # J_Lᵀ Jz
                ]
            data_vec = torch.stack([d.to(torch.float64) for d in data])
            self.averager.mean_([data_vec])
            # ... and parameter-space ones (identical on all processes), per group.
            pairs = [(dz, dz)]
            if refresh:
                pairs += [(zs, dz), (zs, zs)]
                if decayed:
                    weights = [p.detach() for p in params]
                    pairs += [(weights, dz), (weights, zs)]
            dots = space.group_dots(pairs)
            host = torch.cat([data_vec, dots.reshape(-1).to(data_vec.device)]).tolist()  # one sync
            loss.release()

            info = self._decide(host, step, lambd, ws, refresh, decayed)
            if info.skipped:
                info = self._skip(info, buffers_before)
            else:
                rho, beta = info.rho, info.beta
                if trial:
                    info = self._trial_and_commit(info, loss_fn, dz, buffers_before)
                else:
                    self._commit_z(rho, beta, dz)
                    self._move_parameters()
        except BaseException:
            # A user error or an interrupt mid-step: leave the module as it was.
            if buffers_before is not None:
                torch._foreach_copy_(self._tensors.current_buffers(), buffers_before)
            self._engine.abort()
            raise
        finally:
            self._engine.finish()
        self.steps = step
        self.last = info
        return loss.loss, y.detach()

    # ------------------------------------------------------------- helpers
    def _decide(self, host, step, lambd, ws, refresh, decayed) -> StepInfo:
        """Solve the 2×2 system on the host and check every scalar is finite."""
        n = len(self.param_groups)
        loss_value, finite_y = host[0], host[1]
        rest = host[2:]
        net = rest[:5] if refresh else []
        dots = rest[5:] if refresh else rest
        dzdz = dots[:n]

        def skipped(reason: str) -> StepInfo:
            rho, beta = self._last_sizes or (0.0, 0.0)
            return StepInfo(
                step, loss_value, rho, beta, lambd, lambd, 0.0, skipped=True, reason=reason
            )

        if not math.isfinite(loss_value):
            return skipped("loss")
        if not math.isfinite(finite_y):
            return skipped("predictions")
        if not all(math.isfinite(v) for v in dzdz):
            return skipped("Δz")
        if not refresh:
            rho, beta = self._last_sizes if self._last_sizes is not None else (0.0, 0.0)
            rho = self.momentum if self.momentum is not None else rho
            beta = self.beta if self.beta is not None else beta
            return StepInfo(step, loss_value, rho, beta, lambd, lambd, math.nan, refreshed=False)
        zdz, zz = dots[n : 2 * n], dots[2 * n : 3 * n]
        damp = [lambd + w for w in ws]
        a11 = net[0] + sum(d * v for d, v in zip(damp, dzdz, strict=True))
        a12 = net[1] + sum(d * v for d, v in zip(damp, zdz, strict=True))
        a22 = net[2] + sum(d * v for d, v in zip(damp, zz, strict=True))
        b1, b2 = net[3], net[4]
        if decayed:  # the gradient includes κ w
            wdz, wz = dots[3 * n : 4 * n], dots[4 * n : 5 * n]
            b1 += sum(w * v for w, v in zip(ws, wdz, strict=True))
            b2 += sum(w * v for w, v in zip(ws, wz, strict=True))
        if not all(math.isfinite(v) for v in (a11, a12, a22, b1, b2)):
            return skipped("J Δz or the 2×2 system")
        sizes: StepSizes = solve_step_sizes(a11, a12, a22, b1, b2, self.momentum, self.beta)
        if not all(math.isfinite(v) for v in (sizes.rho, sizes.beta, sizes.predicted_change)):
            return skipped("the 2×2 solution")
        return StepInfo(
            step, loss_value, sizes.rho, sizes.beta, lambd, lambd, sizes.predicted_change
        )

    def _skip(self, info: StepInfo, buffers_before) -> StepInfo:
        """Leave parameters and z untouched, restore buffers, raise λ, warn."""
        if buffers_before is not None:
            torch._foreach_copy_(self._tensors.current_buffers(), buffers_before)
        omega = self.lambda_factor**self.lambda_interval
        self.lambd = self.lambd / omega if omega < 1.0 else self.lambd
        warnings.warn(
            f"CurveBall step {info.step} skipped: non-finite {info.reason}; parameters and z "
            f"are unchanged, damping raised to λ={self.lambd:.4g}",
            RuntimeWarning,
            stacklevel=3,
        )
        return replace(info, next_lambd=self.lambd)

    def _commit_z(self, rho: float, beta: float, dz: list[torch.Tensor]) -> None:
        """z ← ρ z − β Δz."""
        torch._foreach_mul_(self._zs, rho)
        torch._foreach_add_(self._zs, dz, alpha=-beta)
        if self.momentum is None or self.beta is None:
            self._last_sizes = (rho, beta)

    def _move_parameters(self) -> None:
        """w ← w + α z, per group."""
        with torch.no_grad():
            for group, members in zip(self.param_groups, self._members, strict=True):
                if members and group["lr"] != 0.0:
                    torch._foreach_add_(
                        [self._params[i] for i in members],
                        [self._zs[i] for i in members],
                        alpha=group["lr"],
                    )

    def _trial_and_commit(self, info: StepInfo, loss_fn, dz, buffers_before) -> StepInfo:
        """Evaluate the loss at w + α z' on the same batch, adapt λ, then commit or skip."""
        new_z = torch._foreach_mul(self._zs, info.rho)
        torch._foreach_add_(new_z, dz, alpha=-info.beta)
        values = [p.detach() for p in self._params]
        with torch.no_grad():
            for group, members in zip(self.param_groups, self._members, strict=True):
                if members and group["lr"] != 0.0:
                    moved = torch._foreach_add(
                        [values[i] for i in members], [new_z[i] for i in members], alpha=group["lr"]
                    )
                    for i, v in zip(members, moved, strict=True):
                        values[i] = v
            trial = self._engine.evaluate(values)
            trial_loss = loss_fn(trial).detach().reshape(()).to(torch.float64)
        trial_vec = trial_loss.reshape(1)
        self.averager.mean_([trial_vec])
        trial_value = trial_vec.item()
        if not math.isfinite(trial_value):
            return self._skip(replace(info, skipped=True, reason="trial loss"), buffers_before)
        ratio = trust_ratio(trial_value - info.loss, info.predicted_change)
        omega = self.lambda_factor**self.lambda_interval
        self.lambd = adjust_damping(self.lambd, ratio, self.lambda_thresholds, omega)
        torch._foreach_copy_(self._zs, new_z)  # in place: state["z"] keeps its tensors
        if self.momentum is None or self.beta is None:
            self._last_sizes = (info.rho, info.beta)
        with torch.no_grad():
            torch._foreach_copy_(self._params, values)
        return replace(info, trust_ratio=ratio, next_lambd=self.lambd)


def _finite_flag(y: torch.Tensor) -> torch.Tensor:
    """0 when every prediction is finite, NaN otherwise (so averaging spreads it)."""
    ok = torch.isfinite(y.detach()).all()
    return torch.where(ok, 0.0, math.nan).to(torch.float64)
