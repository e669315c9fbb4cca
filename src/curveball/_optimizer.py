"""The CurveBall optimizer (Henriques et al., ICCV 2019, arXiv:1805.08095): the step's stages.

The class keeps the bookkeeping of a ``torch.optim`` optimizer; the maths lives
in the modules it calls: curvature products in :mod:`curveball._curvature`, the
2×2 system in :mod:`curveball._quadratic_model`, the damping rule in
:mod:`curveball._damping`, the step's host values in
:mod:`curveball._step_scalars`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from curveball import _damping
from curveball._curvature.engine import JacobianEngine
from curveball._curvature.engine_choice import MODES, EngineChoice
from curveball._curvature.forward_mode import ForwardModeEngine
from curveball._curvature.loss_derivatives import MAX_CLAMPED_OUTPUTS, LossDerivatives
from curveball._curvature.module_tensors import ModuleTensors
from curveball._curvature.row_subset import leading_rows
from curveball._distributed import Averager
from curveball._loss_scale import MIN_SCALE, after_finite, after_overflow, float16_in_use
from curveball._param_vectors import HALF_PRECISION, ParamLayout, dot
from curveball._preconditioner import (
    Workspace,
    average_dtype,
    precondition_,
    square_average_like,
    workspace_like,
)
from curveball._quadratic_model import QuadraticModel, convexified
from curveball._state import STATE_KEY, CurveBallState
from curveball._step_info import StepInfo
from curveball._step_scalars import StepScalars
from curveball._undo import BufferSnapshot
from curveball._warn import OnceWarner

PAPER_DEFAULTS: dict[str, Any] = {
    "lr": 1.0,
    "momentum": None,
    "beta": None,
    "lambd": 1.0,
    "auto_lambda": True,
    "lambda_factor": 0.999,
    "lambda_thresholds": (0.5, 1.5),
    "lambda_interval": 5,
    "lambda_min": 0.0,
    "weight_decay": 0.0,
    "step_size_interval": 1,
    "precondition": False,
    "reject_uphill": False,
    "curvature_fraction": 1.0,
}
"""Constructor keywords with which ``CurveBall(model, **PAPER_DEFAULTS)`` is the authors'
method (Henriques et al., ICCV 2019), whatever the defaults become. (One guard applies to
every setting: a trust-region test whose predicted and measured changes are both within
:data:`ROUNDING_UNITS` units of the loss's precision leaves λ as it is.)"""

ROUNDING_UNITS = 16
"""A trial loss above the loss before the step by at most this many units of the loss's
precision (relative) counts as unchanged, not risen, for ``reject_uphill``; a test whose
predicted and measured changes are both that small leaves λ as it is."""

_AVERAGE = "dz_square_average"  # the preconditioner's state key (float32 for half parameters)

NOT_CUT = {
    "unsupported": (
        "CurveBall: curvature_fraction applies to forward-mode AD only; this step ran on "
        "the double-backward path, where J Δz is computed on the whole batch"
    ),
    "unseen": (
        "CurveBall: curvature_fraction could not cut the batch, because model_fn did not "
        "call the module given to CurveBall with a tensor argument; J Δz is computed on the "
        "whole batch. Call the module itself in model_fn (model(x), not model.forward(x) "
        "or its submodules)"
    ),
}
"""Warnings for a curvature mini-batch that could not be cut (a batch too small to cut
needs none: its J Δz is exact)."""

PER_GROUP = ("lr", "weight_decay")
"""Hyper-parameters that may differ between parameter groups; all others are global."""


@dataclass(frozen=True)
class _Plan:
    """What one step computes: its number, λ, whether it solves for ρ, β and tests λ."""

    step: int
    lambd: float
    refresh: bool
    trial: bool
    loss_scale: float | None  # the float16 scale of the backward pass, if active
    precondition: tuple[float, float] | None  # (decay, eps) of the preconditioner, if on


@dataclass
class _Layout:
    """The trainable parameters, their groups and the engines; rebuilt when the set changes."""

    key: tuple[int, ...]
    params: list[torch.Tensor]
    members: list[list[int]]  # per group, the indices of its trainable parameters
    vectors: ParamLayout
    tensors: ModuleTensors | None
    engines: EngineChoice
    zs: list[torch.Tensor] | None = None
    averages: list[torch.Tensor] | None = None  # the preconditioner's v, if it is on
    workspace: Workspace | None = None  # the preconditioner's buffers, if it is on
    kept: list[torch.Tensor] | None = None  # z and w before a trial commit, if kept in buffers
    whole_batch_jvp: bool = False  # the curvature mini-batch failed on this model: not retried


@dataclass
class _Products:
    """The results of a step's AD passes."""

    predictions: torch.Tensor
    loss: LossDerivatives
    dz: list[torch.Tensor]
    jz: torch.Tensor
    h_jz: torch.Tensor
    jdz: torch.Tensor | None = None  # with H_L JΔz, only when ρ and β are solved for
    h_jdz: torch.Tensor | None = None
    dz_scale: float = 1.0  # jdz and h_jdz belong to dz_scale · Δz
    rows: int | None = None  # jdz holds J Δz on these leading rows only (zeros below)
    averages: list[torch.Tensor] | None = None  # the preconditioner's v after this step
    denominators: list[torch.Tensor] | None = None  # its √v + ε: d = Δz / (√v + ε)

    def set_direction(self, jdz: torch.Tensor, rows: int | None) -> None:
        """Keep ``JΔz`` (on the first ``rows`` rows of the predictions only, if given:
        a curvature mini-batch) and ``H_L JΔz``."""
        if rows is not None:
            padded = torch.zeros_like(self.jz)
            padded[:rows] = jdz
            jdz = padded
        self.jdz, self.rows = jdz, rows
        self.h_jdz = self.loss.hvp(jdz)

    def curvature(self, precise: bool) -> dict[str, torch.Tensor] | None:
        """The network-side terms of the 2×2 system (float64 accumulation if ``precise``).

        On a curvature mini-batch of ``r`` of the ``n`` rows, the three curvature
        terms are the mini-batch's, times ``n / r`` (unbiased for a loss that is a
        sum or mean over rows, as every one of :mod:`curveball.losses` is), and
        ``J_Lᵀ(JΔz)`` is that estimate too; :class:`QuadraticModel` then takes
        ``gᵀΔz`` from the exact identity instead (``groups["raw_dz"]``).
        """
        if self.jdz is None or self.h_jdz is None:
            return None
        j_loss = self.loss.grad.detach()
        n = self.jz.shape[0]
        r = n if self.rows is None else self.rows
        # on the whole batch: weight 1 and c a power of two, so the scaling is exact
        weight, c = n / r, self.dz_scale
        jz, jdz, h_jdz = self.jz[:r], self.jdz[:r], self.h_jdz[:r]
        return {
            "jdz_h_jdz": dot(jdz, h_jdz, precise) * (weight / (c * c)),
            "jz_h_jdz": dot(jz, h_jdz, precise) * (weight / c),
            "jz_h_jz": dot(jz, self.h_jz[:r], precise) * weight,
            "jl_jdz": dot(j_loss[:r], jdz, precise) * (weight / c),
            "jl_jz": dot(j_loss, self.jz, precise),
        }

    def rescale_dz(
        self,
        directional: Callable[[list[torch.Tensor]], tuple[torch.Tensor, int | None]],
        dz_dz: Sequence[float],
    ) -> None:
        """``J(cΔz)`` and ``H_L J(cΔz)`` with ``c`` a power of two making ``‖cΔz‖ ≈ 1``.

        ``Δz`` grows with the loss's scale and ``H_L JΔz`` with its square, which
        leaves float32's range for losses near 1e20; the method itself is
        invariant to that scale.
        """
        norm = math.sqrt(sum(v for v in dz_dz if math.isfinite(v)) or 1.0)
        self.dz_scale = 2.0 ** -round(math.log2(norm)) if math.isfinite(norm) else 1.0
        self.set_direction(*directional(torch._foreach_mul(self.dz, self.dz_scale)))


PHASES = (
    "curveball: pass 1 (y, Jz)",
    "curveball: loss derivatives",
    "curveball: backward (dz)",
    "curveball: pass 2 (J dz)",
    "curveball: scalars and solve",
    "curveball: update",
    "curveball: trust-region test",
)
"""The labels of a step's stages in ``torch.profiler`` traces, in the order they run."""


class CurveBall(torch.optim.Optimizer):
    r"""CurveBall: a minimal Newton solver interleaved with the parameter updates.

    From "Small steps and giant leaps: Minimal Newton solvers for Deep Learning",
    J. F. Henriques, S. Ehrhardt, S. Albanie, A. Vedaldi, ICCV 2019
    (arXiv:1805.08095). With ``J`` the Jacobian of the predictions ``y``,
    ``J_L``/``H_L`` the gradient/Hessian of the loss in ``y``, ``G = Jᵀ H_L J``
    and weight decay ``κ``, each step does::

        y, J z   ← one forward pass carrying the tangent z        (forward-mode AD)
        Δz       ← Jᵀ(H_L J z + J_L) + κ w + (λ + κ) z             (one backward pass)
        d        ← Δz / (√v + ε),  v ← γ v + (1 − γ) Δz²          (if precondition; else d = Δz)
        J d      ← one more forward-mode pass
        β, −ρ    ← argmin of the model over span{z, d} (2×2 system, float64)
        z        ← ρ z − β d
        w        ← w + α z
        every T steps: r = (L(w_new) − L(w_old)) / M(z');
                       λ ← λ / ω if r < r_low,  λ ← λ ω if r > r_high,  ω = factor^T
                       if r < 0 (reject_uphill): w and buffers back, z ← 0, λ ← 2λ

    The defaults differ from the paper's in four places, measured on the
    wall-clock race and the paper's experiments (README): the diagonal
    preconditioner of :mod:`curveball._preconditioner` is on, λ starts at 0.1
    instead of 1, a trust-region test that finds the loss risen rejects the
    step, and λ follows the Levenberg-Marquardt rule of Hessian-free optimisation
    (Martens, ICML 2010): ×2/3 or ×3/2 per test at thresholds 3/4 and 1/4, kept at
    0.05 or above (the paper: ×0.995 or ×1/0.995 at 1.5 and 0.5, no floor; see
    :mod:`curveball._damping`). ``CurveBall(model, **PAPER_DEFAULTS)`` is the
    authors' method exactly. With either setting ``z`` converges, on a fixed batch and at
    fixed parameters, to the damped Newton step ``−(G + λI)⁻¹ g``.

    Args:
        params: an ``nn.Module`` (fast path: true forward-mode AD), or an
            iterable of parameters or of parameter-group dicts (then pass
            ``model=`` for the fast path; without it the slower double-backward
            path is used).
        lr: α, scales the parameter step (per group; schedulers work as usual).
        momentum: ρ; ``None`` chooses it automatically at every step.
        beta: β; ``None`` chooses it automatically at every step.
        lambd: the initial damping λ ≥ 0 (the paper: 1).
        auto_lambda: adapt λ with the trust-region rule.
        lambda_factor: the per-step factor of the rule, in (0, 1];
            ``ω = lambda_factor ** lambda_interval`` (default ``(2/3) ** (1/5)``:
            ω = 2/3 at the default interval; the paper: 0.999).
        lambda_thresholds: ``(low, high)`` trust-ratio thresholds, ``low < high``
            (the paper: ``(0.5, 1.5)``).
        lambda_interval: T, the number of steps between trust-region tests.
        weight_decay: κ, L2 penalty ``½ κ ‖w‖²`` (per group), entering both the
            gradient and the curvature.
        step_size_interval: solve for ρ and β every this many steps only, and
            reuse the last values in between (skipping the second forward-mode
            pass there) while they are a contraction, 0 ≤ ρ ≤ 1 and β ≥ 0 (other
            values are solved for anew). Steps with a trust-region test always solve.
        precondition: step ``z`` along ``d = Δz / (√v + ε)`` instead of ``Δz``,
            with ``v`` a moving average of ``Δz²`` (see
            :mod:`curveball._preconditioner`; off in the paper's method).
        precondition_decay: γ of that moving average, in [0, 1).
        precondition_eps: ε > 0.
        reject_uphill: when a trust-region test finds the loss on the step's own
            batch higher after the step than before (r < 0: the quadratic model was
            wrong about the step's direction; by more than :data:`ROUNDING_UNITS`
            units of the loss's precision), undo the step (parameters and
            buffers), restart ``z`` from zero and double λ; otherwise (the paper's
            method) the step stands and λ grows by the factor 1/ω only. ``z`` is the
            state of the inner Newton solver: once a step has carried it far off,
            the exact minimiser over span{z, d} can be arbitrarily large, and
            later steps compound it.
        curvature_fraction: compute ``J d`` (the second forward-mode pass) on the
            first ``⌈f n⌉`` samples of the batch only, a curvature mini-batch as in
            Hessian-free optimisation (Martens, ICML 2010); the curvature terms of the
            2×2 system are then estimated on it, while ``g`` and ``Δz`` stay exact,
            and ``gᵀd`` comes from the exact identity ``gᵀd = Δzᵀd − zᵀ(G + λI)d``.
            The batch is cut along the first dimension of the tensors the module is
            called with (:mod:`curveball._curvature.row_subset`): the loss must be a
            sum or mean over the predictions' rows. With dropout, the cut pass draws its
            own masks (the first pass's cannot be cut to fewer samples). 1 (the paper)
            uses the whole batch.
        lambda_min: the trust-region rule does not shrink λ below this (0: no
            floor, as in the paper; the initial λ may be lower, and rejections and
            skips still raise it).
        model: the module owning the parameters, when ``params`` are not a module.
        forward_mode: ``"auto"`` (forward-mode AD, falling back to double
            backward as :mod:`curveball._curvature.engine_choice` describes),
            ``"forward"`` (never fall back) or ``"double-backward"``.
        process_group: the ``torch.distributed`` group to average over; by default
            the default group when ``torch.distributed`` is initialised.

    Every hyper-parameter lives in ``param_groups`` (so ``state_dict()`` carries
    it and schedulers see it); only ``lr`` and ``weight_decay`` may differ between
    groups. ``lambd`` there is the initial damping; the current one is
    :attr:`lambd`.

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
        lambd: float = 0.1,
        auto_lambda: bool = True,
        lambda_factor: float = _damping.DEFAULT_FACTOR,
        lambda_thresholds: tuple[float, float] = _damping.DEFAULT_THRESHOLDS,
        lambda_interval: int = _damping.DEFAULT_INTERVAL,
        weight_decay: float = 0.0,
        *,
        step_size_interval: int = 1,
        precondition: bool = True,
        precondition_decay: float = 0.999,
        precondition_eps: float = 1e-8,
        reject_uphill: bool = True,
        curvature_fraction: float = 1.0,
        lambda_min: float = _damping.DEFAULT_MINIMUM,
        model: nn.Module | None = None,
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
        if forward_mode not in MODES:
            raise ValueError(f"forward_mode: expected one of {MODES}, got {forward_mode!r}")
        if forward_mode == "forward" and model is None:
            raise ValueError(
                "forward_mode='forward' needs the nn.Module: pass CurveBall(model) or model=..."
            )
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "beta": beta,
            "lambd": lambd,
            "auto_lambda": auto_lambda,
            "lambda_factor": lambda_factor,
            "lambda_thresholds": lambda_thresholds,
            "lambda_interval": lambda_interval,
            "step_size_interval": step_size_interval,
            "precondition": precondition,
            "precondition_decay": precondition_decay,
            "precondition_eps": precondition_eps,
            "reject_uphill": reject_uphill,
            "curvature_fraction": curvature_fraction,
            "lambda_min": lambda_min,
        }
        _check_hyperparameters(defaults)
        defaults["lambda_thresholds"] = tuple(float(v) for v in lambda_thresholds)
        super().__init__(params, defaults)
        if not any(p.requires_grad for g in self.param_groups for p in g["params"]):
            raise ValueError("params: no trainable parameters (none has requires_grad=True)")
        self.model = model
        self.forward_mode = forward_mode
        self.averager = Averager(process_group)
        self.curveball_state = CurveBallState(lambd=float(lambd))
        self.last: StepInfo | None = None
        self._layout: _Layout | None = None
        self._warn_once = OnceWarner()
        if model is not None:
            _check_sparse_modules(model)

    # ------------------------------------------------------------ bookkeeping
    @property
    def lambd(self) -> float:
        """The current damping λ."""
        return self.curveball_state.lambd

    @property
    def steps(self) -> int:
        """The number of steps taken."""
        return self.curveball_state.step

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its global hyper-parameters must equal the other groups'."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError("params: sparse parameters are not supported")
            if p.is_complex():
                raise ValueError("params: complex parameters are not supported")
            if not p.is_floating_point():
                raise ValueError(f"params: expected floating-point parameters, got {p.dtype}")
        _check_hyperparameters(group)
        self._hyperparameters()

    def _hyperparameters(self) -> dict[str, Any]:
        """The global hyper-parameters, checked equal across groups."""
        first = self.param_groups[0]
        shared = [name for name in self.defaults if name not in PER_GROUP]
        for index, group in enumerate(self.param_groups[1:], start=1):
            for name in shared:
                value = first.get(name)
                if group.get(name) != value:
                    raise ValueError(
                        f"param_groups[{index}]['{name}']: {group.get(name)!r} differs from "
                        f"param_groups[0]['{name}'] = {value!r}; only {PER_GROUP} may differ "
                        "between groups"
                    )
        return first

    def state_dict(self) -> dict[str, Any]:
        """The ``torch.optim`` state dict, plus the global state under ``"curveball"``."""
        out = super().state_dict()
        out[STATE_KEY] = self.curveball_state.to_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this or of the 0.1.0 release, after checking its shapes."""
        state_dict = dict(state_dict)
        saved = state_dict.pop(STATE_KEY, None)
        record = CurveBallState.from_dict(saved) if saved is not None else None
        self._check_saved_shapes(state_dict)
        averages = [
            (p, state[_AVERAGE])
            for _, p, state in _saved_states(state_dict, self.param_groups)
            if isinstance(state.get(_AVERAGE), torch.Tensor)
        ]
        super().load_state_dict(state_dict)
        for p, v in averages:  # torch.optim casts every state tensor to its parameter's dtype
            self.state[p][_AVERAGE] = v.to(device=p.device, dtype=average_dtype(p))
        for group in self.param_groups:
            # 0.1.0 kept only lr and weight_decay in the groups: the others come from the
            # constructor, except the preconditioner, which no older checkpoint trained with
            for name, value in self.defaults.items():
                group.setdefault(name, False if name == "precondition" else value)
            _check_hyperparameters(group)
        self._hyperparameters()
        if record is not None:
            self.curveball_state = record
        self._layout = None  # rebuild the layout around the loaded z

    def _check_saved_shapes(self, state_dict: dict[str, Any]) -> None:
        for index, p, state in _saved_states(state_dict, self.param_groups):
            z = state.get("z")
            if isinstance(z, torch.Tensor) and tuple(z.shape) != tuple(p.shape):
                raise ValueError(
                    f"state_dict: z of parameter {index} has shape {tuple(z.shape)}, but the "
                    f"parameter has shape {tuple(p.shape)}: the checkpoint belongs to another "
                    "model"
                )

    def _prepare(self) -> _Layout:
        """(Re)build the layout and the engines when the trainable set changed."""
        params, groups = [], []
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    params.append(p)
                    groups.append(index)
        if not params:
            raise ValueError("params: no trainable parameters (none has requires_grad=True)")
        key = tuple(id(p) for p in params)
        layout = self._layout
        if layout is None or layout.key != key:
            tensors = ModuleTensors(self.model, params) if self.model is not None else None
            mode = "double-backward" if tensors is None else self.forward_mode
            layout = self._layout = _Layout(
                key=key,
                params=params,
                members=[
                    [i for i, g in enumerate(groups) if g == index]
                    for index in range(len(self.param_groups))
                ],
                vectors=ParamLayout(params, groups, len(self.param_groups)),
                tensors=tensors,
                engines=EngineChoice(params, tensors, mode, self._fell_back),
            )
        if layout.zs is None:
            # z must be laid out like its parameter: it is the tangent of forward mode
            layout.zs = [
                self._state_tensor(p, "z", torch.zeros_like(p, memory_format=torch.preserve_format))
                for p in params
            ]
        if layout.averages is None and self.param_groups[0]["precondition"]:
            layout.averages = [
                self._state_tensor(p, _AVERAGE, square_average_like(p)) for p in params
            ]
            if _keeps_buffers(params):
                layout.workspace = workspace_like(layout.averages)
        return layout

    def _fell_back(self, message: str) -> None:
        self._warn_once("fallback", message)

    def _state_tensor(self, p: torch.Tensor, key: str, fresh: torch.Tensor) -> torch.Tensor:
        """``self.state[p][key]``: ``fresh`` (zeros) if absent, else the saved values in
        ``fresh``'s layout, dtype and device when they differ."""
        state = self.state[p]
        saved = state.get(key)
        if saved is None:
            saved = fresh
        elif not isinstance(saved, torch.Tensor) or saved.shape != p.shape:
            got = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise ValueError(
                f"state_dict: {key} of a parameter of shape {tuple(p.shape)} has shape {got}"
            )
        elif (saved.stride(), saved.dtype, saved.device) != (
            fresh.stride(),
            fresh.dtype,
            fresh.device,
        ):
            saved = fresh.copy_(saved)
        state[key] = saved
        return saved

    # ------------------------------------------------------------------ step
    def step(  # type: ignore[override]
        self,
        model_fn: Callable[[], torch.Tensor] | None = None,
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        closure: Callable[[], Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One CurveBall iteration on the batch that ``model_fn`` evaluates.

        ``model_fn`` runs two or three times per step (on test steps once more,
        without gradients), always on the same batch and with the same random
        draws: it must evaluate the model on a batch chosen outside it, not draw
        its own.

        Args:
            model_fn: runs the model on the current batch, returns the predictions.
            loss_fn: maps the predictions to a scalar loss (mean over the batch).
            closure: called once before the step, for training loops that hand
                every optimizer one (PyTorch Lightning runs its hooks in it). It
                cannot replace ``model_fn`` and ``loss_fn``: CurveBall runs its own
                forward-mode and backward passes.

        Returns:
            ``(loss, predictions)`` at the parameters before the step, detached.
        """
        if closure is not None:
            with torch.enable_grad():
                closure()
        if model_fn is None or loss_fn is None:
            raise TypeError(
                "CurveBall.step(model_fn, loss_fn): both are needed, since CurveBall runs its "
                "own forward-mode and backward passes (a closure that calls backward() cannot "
                "give it the curvature). With PyTorch Lightning use manual optimization and "
                "call self.optimizers().step(model_fn=..., loss_fn=...); with the Hugging Face "
                "Trainer use curveball.integrations.transformers.CurveBallTrainer."
            )
        if not callable(model_fn):
            raise TypeError(f"model_fn: expected a callable, got {type(model_fn).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        hyper = self._hyperparameters()
        layout = self._prepare()
        plan = self._plan(hyper)
        buffers = None
        if layout.tensors is not None and layout.tensors.buffer_slots:
            buffers = BufferSnapshot(layout.tensors.current_buffers)
        undo = buffers.restore if buffers is not None else _nothing
        engines = layout.engines
        try:
            products = engines.run(
                lambda engine: self._products(engine, model_fn, loss_fn, layout, plan), undo
            )
            with record_function(PHASES[4]):
                scalars = self._read_scalars(products, layout, plan)
                info = self._decide(scalars, plan, hyper)
            if info.skipped:
                info = self._skip(info, undo)
            elif plan.trial:
                info = self._trust_region_test(info, products.dz, loss_fn, hyper, undo)
            else:
                with record_function(PHASES[5]):
                    self._commit(info, products.dz)
            if products.averages is not None and not info.skipped:
                self._adopt_averages(layout, products.averages)
        except BaseException:
            # A user error or an interrupt mid-step: leave the module as it was.
            undo()
            engines.engine.abort()
            raise
        finally:
            engines.engine.finish()
        self.curveball_state.step = plan.step
        if plan.loss_scale is not None and not info.skipped:
            state = self.curveball_state
            state.loss_scale, state.scaled_steps = after_finite(
                state.loss_scale, state.scaled_steps
            )
        self.last = replace(info, engine=_engine_name(engines.engine))
        return products.loss.loss, products.predictions.detach()

    def _adopt_averages(self, layout: _Layout, updated: list[torch.Tensor]) -> None:
        """Make ``v'`` the preconditioner's average: it and the old ``v`` trade places
        (the old buffers receive the next step's ``v'``) instead of being copied."""
        previous = layout.averages
        assert previous is not None
        layout.averages = updated
        for p, v in zip(layout.params, updated, strict=True):
            self.state[p][_AVERAGE] = v
        if layout.workspace is not None:
            layout.workspace = (previous, layout.workspace[1])

    def _plan(self, hyper: dict[str, Any]) -> _Plan:
        state = self.curveball_state
        step = state.step + 1
        auto_sizes = hyper["momentum"] is None or hyper["beta"] is None
        trial = hyper["auto_lambda"] and step % hyper["lambda_interval"] == 0
        due = (step - 1) % hyper["step_size_interval"] == 0
        refresh = trial or (auto_sizes and (due or not _reusable(state.sizes, hyper)))
        scale = state.loss_scale if float16_in_use(self._layout.params) else None
        precondition = None
        if hyper["precondition"]:
            precondition = (hyper["precondition_decay"], hyper["precondition_eps"])
        return _Plan(
            step=step,
            lambd=state.lambd,
            refresh=refresh,
            trial=trial,
            loss_scale=scale,
            precondition=precondition,
        )

    def _products(
        self,
        engine: JacobianEngine,
        model_fn: Callable[[], torch.Tensor],
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        layout: _Layout,
        plan: _Plan,
    ) -> _Products:
        """The AD passes: ``y, Jz`` → ``J_L, H_L Jz`` → ``Δz`` → (``JΔz``, ``H_L JΔz``)."""
        zs = layout.zs
        assert zs is not None
        # a curvature mini-batch runs the second pass afresh: nothing to keep for it
        replayed = plan.refresh and not self._curvature_minibatch(layout)
        with record_function(PHASES[0]):
            y, jz = engine.linearize(model_fn, zs, jvp_follows=replayed)
        with record_function(PHASES[1]):
            psd = self.curveball_state.psd_loss and LossDerivatives.can_clamp(y)
            loss = LossDerivatives(loss_fn, y, psd=psd, upcast=plan.loss_scale is not None)
            j_loss = loss.grad.detach()
            h_jz = loss.hvp(jz)
        with record_function(PHASES[2]):
            dz = self._backward(engine, y, h_jz + j_loss, layout, plan)
        products = _Products(y, loss, dz, jz, h_jz)
        if plan.precondition is not None:  # from here on, "Δz" is the direction d = P Δz
            assert layout.averages is not None
            products.averages, products.denominators = precondition_(
                dz, layout.averages, *plan.precondition, layout.workspace
            )
        if plan.refresh:
            with record_function(PHASES[3]):
                products.set_direction(*self._directional(engine, layout, y.shape, dz))
        return products

    def _curvature_minibatch(self, layout: _Layout) -> bool:
        return self.param_groups[0]["curvature_fraction"] < 1.0 and not layout.whole_batch_jvp

    def _directional(
        self,
        engine: JacobianEngine,
        layout: _Layout,
        shape: torch.Size,
        dz: list[torch.Tensor],
    ) -> tuple[torch.Tensor, int | None]:
        """``JΔz``, on a curvature mini-batch if one is asked for: then with the number of
        leading rows of the predictions that it holds (``None``: the whole batch)."""
        if not self._curvature_minibatch(layout):
            return engine.jvp(dz), None
        fraction = self.param_groups[0]["curvature_fraction"]
        jdz, outcome = engine.jvp_leading_rows(dz, fraction)
        if outcome != "cut":
            if outcome in NOT_CUT:
                self._warn_once(f"whole batch: {outcome}", NOT_CUT[outcome])
            return jdz, None  # computed on the whole batch: exact
        rows = leading_rows(shape, jdz.shape)
        if rows is None or rows == shape[0]:  # all n rows from a cut batch: not rows of it
            layout.whole_batch_jvp = True
            self._warn_once(
                "whole batch: shape",
                f"CurveBall: curvature_fraction={fraction} cut the batch along the first "
                f"dimension of the model's arguments, but the predictions came out shaped "
                f"{tuple(jdz.shape)} instead of leading rows of {tuple(shape)} (the batch is "
                "not their first dimension); J Δz is computed on the whole batch from now on",
            )
            return engine.jvp(dz), None
        return jdz, rows

    def _backward(
        self,
        engine: JacobianEngine,
        y: torch.Tensor,
        cotangent: torch.Tensor,
        layout: _Layout,
        plan: _Plan,
    ) -> list[torch.Tensor]:
        """``Δz = Jᵀ(H_L J z + J_L) + κ w + (λ + κ) z``, averaged over processes."""
        zs = layout.zs
        assert zs is not None
        if plan.loss_scale is None:
            dz = engine.vjp(cotangent)
        else:  # float16: a scaled backward pass, unscaled exactly (a power of two)
            dz = engine.vjp((cotangent * plan.loss_scale).to(y.dtype))
            torch._foreach_mul_(dz, 1.0 / plan.loss_scale)
        layout.vectors.mean_(dz, self.averager)
        for group, members in zip(self.param_groups, layout.members, strict=True):
            factor = plan.lambd + group["weight_decay"]
            if members and group["weight_decay"] > 0:
                torch._foreach_add_(
                    [dz[i] for i in members],
                    [layout.params[i].detach() for i in members],
                    alpha=group["weight_decay"],
                )
            if members and factor != 0.0:
                torch._foreach_add_(
                    [dz[i] for i in members], [zs[i] for i in members], alpha=factor
                )
        return dz

    def _read_scalars(self, products: _Products, layout: _Layout, plan: _Plan) -> StepScalars:
        """Every scalar the step needs, on the host in one transfer.

        The inner products accumulate in the parameters' precision (float32 at
        least). Should one overflow (a loss near 1e20 in float32 has squared norms
        beyond float32's range), they are formed again in float64, and ``JΔz`` for a
        rescaled ``Δz`` if that is still not enough: one or two more host
        transfers (and a forward-mode pass) on such a step only, no cost on others.
        """
        dz, zs = products.dz, layout.zs
        assert zs is not None
        pairs = {"dz_dz": (dz, dz)}
        if plan.refresh:
            pairs.update(z_dz=(zs, dz), z_z=(zs, zs))
            if products.rows is not None:
                pairs["raw_dz"] = (_unpreconditioned(products), dz)
            if any(group["weight_decay"] > 0 for group in self.param_groups):
                weights = [p.detach() for p in layout.params]
                pairs.update(w_dz=(weights, dz), w_z=(weights, zs))
        scalars = self._gather(products, layout, pairs, precise=False)
        if _overflowed(scalars):
            scalars = self._gather(products, layout, pairs, precise=True)
            if _overflowed(scalars) and plan.refresh:
                # H_L JΔz itself overflowed: redo it for a rescaled Δz
                engine = layout.engines.engine
                products.rescale_dz(
                    lambda t: self._directional(engine, layout, products.jz.shape, t),
                    scalars.groups["dz_dz"],
                )
                scalars = self._gather(products, layout, pairs, precise=True)
        products.loss.release()
        return scalars

    def _gather(
        self, products: _Products, layout: _Layout, pairs: dict, precise: bool
    ) -> StepScalars:
        dots = layout.vectors.group_dots(list(pairs.values()), precise)
        return StepScalars.read(
            products.loss.loss,
            products.predictions,
            products.curvature(precise),
            dict(zip(pairs, dots, strict=True)),
            self.averager,
        )

    def _decide(self, scalars: StepScalars, plan: _Plan, hyper: dict[str, Any]) -> StepInfo:
        """Solve for ρ and β (or reuse them), unless a scalar is non-finite."""
        last = self.curveball_state.sizes or (0.0, 0.0)
        info = StepInfo(plan.step, scalars.loss, *last, plan.lambd, plan.lambd, 0.0)

        def skipped(reason: str) -> StepInfo:
            return replace(info, skipped=True, reason=reason)

        if not math.isfinite(scalars.loss):
            return skipped("non-finite loss")
        if not scalars.predictions_finite:
            return skipped("non-finite predictions")
        if not all(math.isfinite(v) for v in scalars.groups["dz_dz"]):
            if plan.loss_scale is not None and plan.loss_scale > MIN_SCALE:
                return skipped(f"float16 overflow of the loss scale {plan.loss_scale:g}")
            return skipped("non-finite Δz")
        if not plan.refresh:
            rho = hyper["momentum"] if hyper["momentum"] is not None else last[0]
            beta = hyper["beta"] if hyper["beta"] is not None else last[1]
            return replace(info, rho=rho, beta=beta, predicted_change=math.nan, refreshed=False)
        weight_decays = [group["weight_decay"] for group in self.param_groups]
        assert scalars.curvature is not None
        if not all(math.isfinite(v) for v in scalars.curvature.values()):
            return skipped("non-finite J Δz or 2×2 system")
        curvature, indefinite = convexified(scalars.curvature)
        if indefinite:
            self._loss_not_convex()
        model = QuadraticModel.assemble(scalars, plan.lambd, weight_decays, curvature)
        if not model.is_finite():
            return skipped("non-finite J Δz or 2×2 system")
        sizes = model.solve(hyper["momentum"], hyper["beta"])
        if not all(math.isfinite(v) for v in (sizes.rho, sizes.beta, sizes.predicted_change)):
            return skipped("non-finite 2×2 solution")
        info = replace(
            info, rho=sizes.rho, beta=sizes.beta, predicted_change=sizes.predicted_change
        )
        if sizes.rho == 0.0 and sizes.beta == 0.0 and (model.b1 != 0.0 or model.b2 != 0.0):
            return skipped(
                "no move: the quadratic model has no descent direction in span{z, Δz} "
                "(no curvature and no damping along the gradient)"
            )
        return info

    def _loss_not_convex(self) -> None:
        """Use the positive part of H_L from the next step on; say so once."""
        self.curveball_state.psd_loss = True
        self._warn_once(
            "not convex",
            "CurveBall: the loss is not convex in the predictions (its Hessian H_L has negative "
            "curvature along this step's directions); this step uses the positive part of the "
            "2×2 model, and later steps the positive part of H_L per sample (for up to "
            f"{MAX_CLAMPED_OUTPUTS} predictions per sample; beyond that, each step's 2×2 model "
            "is made convex), which keeps the curvature positive semi-definite as the method "
            "requires",
        )

    def _commit(self, info: StepInfo, dz: list[torch.Tensor]) -> None:
        """``z ← ρ z − β Δz``, then ``w ← w + α z`` per group; remember automatic ρ, β."""
        layout = self._layout
        assert layout is not None and layout.zs is not None
        if any(z.dtype in HALF_PRECISION for z in layout.zs):
            # ρ and β need not fit in float16 (β grows as the loss shrinks): combine in float32
            for z, d in zip(layout.zs, dz, strict=True):
                z.copy_(z.float().mul_(info.rho).sub_(d.float(), alpha=info.beta))
        else:
            torch._foreach_mul_(layout.zs, info.rho)
            torch._foreach_add_(layout.zs, dz, alpha=-info.beta)
        with torch.no_grad():
            for group, members in zip(self.param_groups, layout.members, strict=True):
                if members and group["lr"] != 0.0:
                    torch._foreach_add_(
                        [layout.params[i] for i in members],
                        [layout.zs[i] for i in members],
                        alpha=group["lr"],
                    )
        hyper = self.param_groups[0]
        if hyper["momentum"] is None or hyper["beta"] is None:
            self.curveball_state.rho, self.curveball_state.beta = info.rho, info.beta

    def _skip(self, info: StepInfo, undo: Callable[[], None]) -> StepInfo:
        """Leave parameters and z untouched, put the buffers back, raise λ, warn once.

        An overflow of the float16 loss scale halves the scale instead of raising λ.
        """
        undo()
        state = self.curveball_state
        if info.reason is not None and info.reason.startswith("float16 overflow"):
            state.loss_scale, state.scaled_steps = after_overflow(state.loss_scale), 0
            return replace(info, skipped=True, next_lambd=info.lambd)
        hyper = self.param_groups[0]
        omega = _damping.omega(hyper["lambda_factor"], hyper["lambda_interval"])
        lambd = self.curveball_state.lambd = _damping.raise_damping(info.lambd, omega)
        self._warn_once(
            f"skip: {info.reason}",
            f"CurveBall step {info.step} skipped: {info.reason}; parameters and z are "
            f"unchanged, damping raised to λ={lambd:.4g}",
        )
        return replace(info, skipped=True, next_lambd=lambd)

    def _trust_region_test(
        self,
        info: StepInfo,
        dz: list[torch.Tensor],
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        hyper: dict[str, Any],
        undo: Callable[[], None],
    ) -> StepInfo:
        """Commit, evaluate the loss at the new parameters on the same batch, adapt λ.

        If that loss is not finite, the commit is undone and the step skipped; if it
        rose (and ``reject_uphill``), the step is rejected (:meth:`_reject`).
        """
        layout = self._layout
        assert layout is not None and layout.zs is not None
        current = [t.detach() for t in (*layout.zs, *layout.params)]
        if _keeps_buffers(layout.params):
            if layout.kept is None:
                layout.kept = [torch.empty_like(t) for t in current]  # same strides as t
            kept = layout.kept
            torch._foreach_copy_(kept, current)
        else:
            kept = [t.clone() for t in current]
        sizes = self.curveball_state.sizes
        with record_function(PHASES[5]):
            self._commit(info, dz)
        with torch.no_grad(), record_function(PHASES[6]):
            trial = loss_fn(layout.engines.engine.evaluate()).detach()
        trial_vec = trial.reshape(1).to(torch.float64)
        self.averager.mean_([trial_vec])
        trial_value = trial_vec.item()
        if not math.isfinite(trial_value):
            with torch.no_grad():
                torch._foreach_copy_([*layout.zs, *layout.params], kept)
            if sizes is not None:
                self.curveball_state.rho, self.curveball_state.beta = sizes
            return self._skip(replace(info, reason="non-finite trial loss"), undo)
        ratio = _damping.trust_ratio(
            trial_value - info.loss, info.predicted_change, _rounding(info.loss, trial.dtype)
        )
        omega = _damping.omega(hyper["lambda_factor"], hyper["lambda_interval"])
        lambd = _damping.adjust_damping(
            info.lambd, ratio, hyper["lambda_thresholds"], omega, hyper["lambda_min"]
        )
        rejected = hyper["reject_uphill"] and _rose(info.loss, trial_value, trial.dtype)
        if rejected:
            lambd = _damping.after_rejection(lambd)
        self.curveball_state.lambd = lambd
        info = replace(info, trust_ratio=ratio, next_lambd=lambd)
        if rejected:
            return self._reject(info, trial_value, kept[len(layout.zs) :], undo)
        return info

    def _reject(
        self,
        info: StepInfo,
        trial_loss: float,
        weights: list[torch.Tensor],
        undo: Callable[[], None],
    ) -> StepInfo:
        """Undo a step that raised the loss on its own batch and restart ``z`` from zero."""
        layout = self._layout
        assert layout is not None and layout.zs is not None
        with torch.no_grad():
            torch._foreach_copy_(layout.params, weights)
            torch._foreach_zero_(layout.zs)
        undo()
        state = self.curveball_state
        state.rho = state.beta = None  # the next step solves for them anew
        self._warn_once(
            "rejected",
            f"CurveBall step {info.step} rejected: the loss on its batch rose from "
            f"{info.loss:.6g} to {trial_loss:.6g} where the quadratic model predicted a fall "
            f"of {-info.predicted_change:.3g}; the parameters and buffers are back where they "
            f"were, z restarts from zero and λ doubles to {state.lambd:.4g}. Frequent "
            "rejections mean that λ starts too small for this model: raise lambd",
        )
        return replace(info, skipped=True, reason="rejected: the loss rose on the step's batch")


def _saved_states(state_dict: dict[str, Any], groups: list[dict]) -> list[tuple]:
    """``(saved id, parameter, saved state)`` triples, matched as ``torch.optim`` matches
    saved state to parameters (by position across the groups)."""
    saved_ids = [i for g in state_dict.get("param_groups", []) for i in g.get("params", [])]
    params = [p for g in groups for p in g["params"]]
    by_id = dict(zip(saved_ids, params, strict=False))
    return [
        (index, by_id[index], state)
        for index, state in state_dict.get("state", {}).items()
        if isinstance(state, dict) and index in by_id
    ]


def _rounding(loss: float, dtype: torch.dtype) -> float:
    """How far two evaluations of a loss near ``loss`` may differ by rounding alone:
    :data:`ROUNDING_UNITS` units of its precision."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return ROUNDING_UNITS * eps * abs(loss)


def _rose(before: float, after: float, dtype: torch.dtype) -> bool:
    """Whether the loss rose by more than rounding: two evaluations of a loss at nearly
    the same point (a converged run) can differ by a few units of its precision either
    way, and a rise that small must not reject the step."""
    return after - before > _rounding(before, dtype)


def _unpreconditioned(products: _Products) -> list[torch.Tensor]:
    """``Δz`` before the preconditioner, from ``d = Δz / (√v' + ε)``."""
    if products.denominators is None:
        return products.dz
    return [d.to(x.dtype) * x for d, x in zip(products.dz, products.denominators, strict=True)]


def _reusable(sizes: tuple[float, float] | None, hyper: dict[str, Any]) -> bool:
    """Whether the last automatic ρ and β may be reused on a step that does not solve.

    Only a contraction (0 ≤ ρ ≤ 1) along the descent direction (β ≥ 0) is: the exact
    minimiser over one step's plane can be any pair (a negative or large ρ, a negative
    β), which, repeated on later steps' planes, can make z grow geometrically (a ρ of
    −1.6 reused did, on an MLP, until the loss overflowed). Other pairs are solved for anew.
    """
    if sizes is None:
        return False
    rho, beta = sizes
    return (hyper["momentum"] is not None or 0.0 <= rho <= 1.0) and (
        hyper["beta"] is not None or beta >= 0.0
    )


def _keeps_buffers(params: Sequence[torch.Tensor]) -> bool:
    """Whether parameter-sized scratch tensors are kept between steps instead of allocated.

    On a CPU, passes over freshly allocated parameter-sized tensors cost several times
    more than over kept ones; CUDA's caching allocator makes allocation free, and there
    memory is the scarcer resource.
    """
    return all(p.device.type == "cpu" for p in params)


def _nothing() -> None:
    return None


def _overflowed(scalars: StepScalars) -> bool:
    """Whether an inner product is non-finite although the loss and predictions are finite."""
    finite_inputs = math.isfinite(scalars.loss) and scalars.predictions_finite
    return finite_inputs and not all(math.isfinite(v) for v in scalars.values())


def _engine_name(engine: JacobianEngine) -> str:
    return "forward" if isinstance(engine, ForwardModeEngine) else "double-backward"


def _check_hyperparameters(h: dict[str, Any]) -> None:
    """Clear errors for out-of-range hyper-parameters (of the constructor or a group)."""
    for name in ("lr", "lambd", "weight_decay", "lambda_min"):
        value = h[name]
        if not isinstance(value, int | float) or not value >= 0.0 or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite value >= 0, got {value!r}")
    if not 0.0 < h["lambda_factor"] <= 1.0:
        raise ValueError(f"lambda_factor: expected a value in (0, 1], got {h['lambda_factor']}")
    thresholds = h["lambda_thresholds"]
    if len(tuple(thresholds)) != 2 or not thresholds[0] < thresholds[1]:
        raise ValueError(
            f"lambda_thresholds: expected (low, high) with low < high, got {thresholds}"
        )
    for name in ("lambda_interval", "step_size_interval"):
        value = h[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    for name in ("momentum", "beta"):
        value = h[name]
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name}: expected None (automatic) or a finite number, got {value}")
    _check_preconditioner(h)
    if not isinstance(h["reject_uphill"], bool):
        raise ValueError(f"reject_uphill: expected True or False, got {h['reject_uphill']!r}")
    fraction = h["curvature_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise ValueError(f"curvature_fraction: expected a number in (0, 1], got {fraction!r}")


def _check_preconditioner(h: dict[str, Any]) -> None:
    if not isinstance(h["precondition"], bool):
        raise ValueError(f"precondition: expected True or False, got {h['precondition']!r}")
    decay, eps = h["precondition_decay"], h["precondition_eps"]
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"precondition_decay: expected a value in [0, 1), got {decay}")
    if not eps > 0.0 or not math.isfinite(eps):
        raise ValueError(f"precondition_eps: expected a finite value > 0, got {eps}")


def _check_sparse_modules(model: nn.Module) -> None:
    """Sparse gradients cannot be averaged into Δz: refuse them by module name."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.sparse:
            raise ValueError(
                f"model: module {name or type(module).__name__!r} ({type(module).__name__} with "
                "sparse=True) produces sparse gradients, which CurveBall does not support; "
                "construct it with sparse=False"
            )
