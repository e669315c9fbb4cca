"""The CurveBall optimizer (Henriques et al., ICCV 2019, arXiv:1805.08095): the ``torch.optim``
shell.

The class keeps the bookkeeping of a ``torch.optim`` optimizer — the constructor
and its checks, the parameter groups, the state dict — and its :meth:`CurveBall.step`
calls the stages of an iteration in order, each in a module of its own:

* :mod:`curveball._plan` — what the step computes (refresh ρ and β? test λ?);
* :mod:`curveball._products` — the curvature products (the AD passes) and the scalars;
* :mod:`curveball._quadratic_model` — the quadratic model, its 2×2 solve, the decision;
* :mod:`curveball._update` — ``z ← ρ z − β d``, ``w ← w + α z``;
* :mod:`curveball._trust_region` and :mod:`curveball._damping` — the test and the rule for λ;
* :mod:`curveball._rollback` — what a skipped or rejected step goes back to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import nn

from curveball import _damping, _layout, _plan, _rollback, _subnormal
from curveball import _hyperparameters as hyperparameters
from curveball import _inner_loop as inner_loop
from curveball._curvature.engine import JacobianEngine
from curveball._curvature.forward_mode import ForwardModeEngine
from curveball._curvature.jacobian_matrix import JacobianMatrixEngine, takes_matrix
from curveball._distributed import Averager
from curveball._hyperparameters import PAPER_DEFAULTS
from curveball._layout import AVERAGE, Layout
from curveball._plan import Plan
from curveball._preconditioner import average_dtype
from curveball._products import Batch, Products, compute, phase, read_scalars
from curveball._quadratic_model import NOT_CONVEX, decide
from curveball._rollback import Rollback
from curveball._state import STATE_KEY, CurveBallState, group_defaults, split_saved
from curveball._step_info import StepInfo
from curveball._trust_region import trial_loss, trial_update
from curveball._update import move_, step_z_
from curveball._warn import OnceWarner
from curveball.pointwise import PointwiseResidual

__all__ = ["PAPER_DEFAULTS", "CurveBall"]


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

    The defaults differ from the paper's in four places (measured; see the
    documentation): the preconditioner is on, λ starts at 0.1 instead of 1, a risen
    loss rejects the step, and λ follows the Levenberg-Marquardt rule (Martens, ICML
    2010) with a floor (:mod:`curveball._damping`). ``CurveBall(model,
    **PAPER_DEFAULTS)`` is the authors' method exactly. With either setting ``z``
    converges, on a fixed batch and at fixed parameters, to ``−(G + λI)⁻¹ g``.

    Args:
        params: an ``nn.Module`` (forward-mode AD), or an iterable of parameters or of
            group dicts (pass ``model=`` too; without it: the double-backward path).
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
        step_size_interval: solve for ρ and β every this many steps only, reusing
            them in between while :func:`curveball._plan.reusable` allows it.
        precondition: ``True`` or ``"diagonal"``: step ``z`` along ``d = Δz / (√v + ε)``,
            ``v`` a moving average of ``Δz²`` (:mod:`curveball._preconditioner`);
            ``"gauss-newton"``: along ``d = (G + λI)⁻¹ Δz`` from the dense ``G``
            (:mod:`curveball._gauss_newton`; small models); ``"nystrom"``: its rank-``s``
            Nyström approximation (:mod:`curveball._nystrom`); ``"auto"``: the dense one up
            to 2,048 parameters, the sketch up to 131,072, else the diagonal; ``False``:
            ``d = Δz``.
        precondition_decay: γ of that moving average, in [0, 1).
        precondition_eps: ε > 0.
        precondition_interval: form the dense ``G`` (or its sketch) every this many steps;
            ``"auto"``: every step where the products come from a
            :class:`~curveball.pointwise.PointwiseResidual`'s Jacobian held as a matrix,
            every ten steps otherwise.
        precondition_rank: ``s``, the Nyström sketch's number of products; ``"auto"``: 128
            where the Jacobian is held as a matrix, 64 otherwise.
        reject_uphill: a trust-region test that finds the loss on the step's own batch
            risen (r < 0, beyond rounding) rejects the step: parameters and buffers
            back, ``z`` restarted from zero, λ doubled (:mod:`curveball._rollback`);
            otherwise (the paper) the step stands and λ grows by 1/ω only.
        curvature_fraction: run the second forward-mode pass on the first ``⌈f n⌉``
            samples only, a curvature mini-batch as in Hessian-free optimisation
            (Martens, ICML 2010; :mod:`curveball._products`); the loss must be a sum
            or mean over the predictions' rows. 1 (the paper): the whole batch.
        inner_steps: iterations on each step's quadratic model before the parameters
            move (:mod:`curveball._inner_loop`; for a batch that comes every step).
        solver: ``"curveball"`` (the paper: ``z`` minimises the model over span{z, d}),
            ``"conjugate"`` (inner iterations over span{z − z_prev, d}: conjugate
            gradients on the damped Gauss-Newton system), ``"exact"`` (the dense
            Gauss-Newton system solved at every step, with the fixed damping
            ``curveball._hyperparameters.EXACT_DAMPING``: energy natural gradient
            descent's step) or ``"auto"`` (``"exact"`` when ``model_fn`` is a
            :class:`curveball.pointwise.PointwiseResidual`, which brings its Jacobian, on
            at most 2,048 parameters; ``"conjugate"`` otherwise).
        line_search: on a trust-region test that finds the loss risen, halve the step
            until it descends (:mod:`curveball._trust_region`) before rejecting it.
        lambda_min: the trust-region rule does not shrink λ below this (0, the paper:
            no floor; the initial λ may be lower; rejections and skips still raise it).
        model: the module owning the parameters, when ``params`` are not a module.
        forward_mode: ``"auto"`` (forward-mode AD, falling back to double backward),
            ``"forward"``, ``"double-backward"`` or ``"fastest"`` (the faster, measured):
            :mod:`curveball._curvature.engine_choice`.
        process_group: the ``torch.distributed`` group to average over; by default
            the default group when ``torch.distributed`` is initialised.

    Every hyper-parameter lives in ``param_groups``; only ``lr`` and ``weight_decay`` may
    differ between groups. ``lambd`` there is the initial damping, :attr:`lambd` the current.

    Use::

        optimizer = CurveBall(model)
        loss, predictions = optimizer.step(lambda: model(x), lambda y: F.cross_entropy(y, t))

    :meth:`step` takes ``model_fn`` (the predictions on a batch chosen outside it: it
    runs two or three times per step, on test steps once more without a graph in the
    parameters, always with the same random draws), ``loss_fn`` (predictions to a
    scalar loss) and, for training loops that hand every optimizer one, a ``closure``
    called once before the step (it cannot replace the two: CurveBall runs its own
    forward-mode and backward passes).

    After each step, ``optimizer.last`` is a :class:`StepInfo`; ``z`` of ``p`` is ``state[p]["z"]``.
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
        precondition_interval: int | str = 1,
        precondition_rank: int | str = 64,
        reject_uphill: bool = True,
        curvature_fraction: float = 1.0,
        inner_steps: int = 1,
        solver: str = "curveball",
        line_search: bool = False,
        lambda_min: float = _damping.DEFAULT_MINIMUM,
        model: nn.Module | None = None,
        forward_mode: str = "auto",
        process_group: Any = None,
    ) -> None:
        params, model = hyperparameters.module_and_params(params, model, forward_mode)
        defaults = {k: v for k, v in locals().items() if k in hyperparameters.NAMES}
        hyperparameters.check(defaults)
        defaults["lambda_thresholds"] = tuple(float(v) for v in lambda_thresholds)
        super().__init__(params, defaults)
        if not any(p.requires_grad for g in self.param_groups for p in g["params"]):
            raise ValueError("params: no trainable parameters (none has requires_grad=True)")
        self.model = model
        self.forward_mode = forward_mode
        self.averager = Averager(process_group)
        self.curveball_state = CurveBallState(lambd=float(lambd))
        self.last: StepInfo | None = None
        self._layout: Layout | None = None
        self._warn_once = OnceWarner()
        if model is not None:
            hyperparameters.check_sparse_modules(model)

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
        hyperparameters.check_parameters(group["params"])
        hyperparameters.check(group)
        self._hyperparameters()

    def _hyperparameters(self) -> dict[str, Any]:
        """The global hyper-parameters, checked equal across groups."""
        return hyperparameters.shared(self.param_groups, list(self.defaults))

    def state_dict(self) -> dict[str, Any]:
        """The ``torch.optim`` state dict, plus the global state under ``"curveball"``."""
        out = super().state_dict()
        out[STATE_KEY] = self.curveball_state.to_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this or of an earlier release, after checking its shapes."""
        state_dict, record, averages = split_saved(state_dict, self.param_groups)
        super().load_state_dict(state_dict)
        for p, v in averages:  # torch.optim casts every state tensor to its parameter's dtype
            self.state[p][AVERAGE] = v.to(device=p.device, dtype=average_dtype(p))
        group_defaults(self.param_groups, self.defaults)
        for group in self.param_groups:
            hyperparameters.check(group)
        self._hyperparameters()
        if record is not None:
            self.curveball_state = record
        self._layout = None  # rebuild the layout around the loaded z

    def _prepare(self) -> Layout:
        """(Re)build the layout when the trainable set changed; bind z and the averages."""
        fell_back = partial(self._warn_once, "fallback")
        layout = _layout.build(
            self.param_groups, self.model, self.forward_mode, fell_back, self._layout
        )
        kind = hyperparameters.preconditioner(
            self.param_groups[0]["precondition"], _plan.parameter_count(layout.params)
        )
        _layout.attach_state(layout, self.state, kind == "diagonal")
        self._layout = layout
        return layout

    # ------------------------------------------------------------------ step
    def step(  # type: ignore[override]
        self,
        model_fn: Callable[[], torch.Tensor] | None = None,
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        closure: Callable[[], Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One CurveBall iteration on the batch that ``model_fn`` evaluates (see the class);
        returns ``(loss, predictions)`` at the parameters before the step, detached."""
        _call(closure)
        hyper = self._hyperparameters()
        state, groups = self.curveball_state, self.param_groups
        batch = Batch.of(model_fn, loss_fn, groups, state.psd_loss, self.averager, self._warn_once)
        layout = self._prepare()
        given = isinstance(model_fn, PointwiseResidual)
        matrix = given and takes_matrix(model_fn, layout.params)
        plan = _plan.plan(state, hyper, layout.params, jacobian_given=given, matrix=matrix)
        lambd = state.lambd
        rollback = Rollback(layout)
        engines = layout.engines
        try:
            products, info = engines.run(
                lambda engine: self._solve(engine, batch, layout, plan, hyper),
                rollback.buffers,
                matrix=matrix,
            )
            if info.skipped:
                info = self._skip(info, rollback, hyper)
            elif plan.trial:
                info = self._trust_region_test(info, products, batch, hyper, rollback)
            else:
                with phase(5):
                    self._update(info, products, hyper)
            if products.averages is not None and not info.skipped:
                _layout.adopt_averages(layout, self.state, products.averages)
            if not info.skipped and _subnormal.due(plan.step):
                eps = plan.precondition[1] if plan.precondition is not None else None
                _subnormal.sweep_(layout.zs, layout.averages if eps is not None else None, eps)
        except BaseException:
            # A user error or an interrupt mid-step: leave the module as it was.
            rollback.buffers()
            engines.engine.abort()
            raise
        finally:
            engines.engine.finish()
        if plan.solver == "exact":  # its damping is fixed: the rule's λ is for the other solvers
            state.lambd = lambd
            info = replace(info, next_lambd=lambd)
        self._end(plan, info, engines.engine)
        return products.loss.loss, products.predictions.detach()

    def _solve(
        self, engine: JacobianEngine, batch: Batch, layout: Layout, plan: Plan, hyper: dict
    ) -> tuple[Products, StepInfo]:
        """The products and scalars of the step, and the solve for ρ and β."""
        products = compute(engine, batch, layout, plan)
        solved = partial(self._decide, engine, batch=batch, layout=layout, plan=plan, hyper=hyper)
        info = solved(products)
        if plan.inner_steps > 1:
            with phase(8):
                products, info = inner_loop.iterate(
                    engine, products, info, solved, layout, plan, batch
                )
        products.loss.release()
        return products, info

    def _decide(self, engine, products: Products, batch, layout, plan, hyper) -> StepInfo:
        """The scalars of one iteration's products, and the solve for ρ and β."""
        with phase(4):
            scalars = read_scalars(engine, products, layout, plan, batch)
            sizes = self.curveball_state.sizes
            info, indefinite = decide(scalars, plan, hyper, sizes, batch.weight_decays)
        if indefinite:  # the positive part of H_L from the next step on
            self.curveball_state.psd_loss = True
            self._warn_once("not convex", NOT_CONVEX)
        return info

    def _update(self, info: StepInfo, products: Products, hyper: dict[str, Any]) -> None:
        """``z ← ρ z − β d``, then ``w ← w + α z`` per group; remember automatic ρ, β."""
        layout = self._layout
        assert layout is not None and layout.zs is not None
        step_z_(layout.zs, products.dz, info.rho, info.beta, products.previous_step)
        move_(layout.params, layout.zs, layout.members, [g["lr"] for g in self.param_groups])
        automatic = hyper["momentum"] is None or hyper["beta"] is None
        if automatic and products.previous_step is None:  # a conjugate ρ is not a momentum
            self.curveball_state.rho, self.curveball_state.beta = info.rho, info.beta

    def _skip(self, info: StepInfo, rollback: Rollback, hyper: dict[str, Any]) -> StepInfo:
        """Leave parameters and z untouched, put the buffers back, raise λ, warn once."""
        rollback.buffers()
        info, message = _rollback.skip(info, self.curveball_state, hyper)
        if message:
            self._warn_once(f"skip: {info.reason}", message)
        return info

    def _trust_region_test(
        self, info: StepInfo, products: Products, batch: Batch, hyper: dict, rollback: Rollback
    ) -> StepInfo:
        """Update, then the trust-region test; a non-finite trial loss skips the step."""
        info, warning = trial_update(
            info, self.curveball_state, hyper, rollback,
            update=lambda: self._update(info, products, hyper),
            trial=lambda: trial_loss(rollback.engine, batch.loss_fn, self.averager),
        )  # fmt: skip
        if warning == "non-finite":
            return self._skip(replace(info, reason="non-finite trial loss"), rollback, hyper)
        if warning:
            self._warn_once("rejected", warning)
        return info

    def _end(self, plan: Plan, info: StepInfo, engine: JacobianEngine) -> None:
        """Count the step, grow the float16 scale after a finite one, keep the record."""
        self.curveball_state.count(plan.step, plan.loss_scale is not None and not info.skipped)
        engine_name = "forward" if isinstance(engine, ForwardModeEngine) else "double-backward"
        if isinstance(engine, JacobianMatrixEngine):
            engine_name = "jacobian"
        self.last = replace(info, engine=engine_name)


def _call(closure: Callable[[], Any] | None) -> None:
    """Run a training loop's closure (with gradients, as ``torch.optim`` does), if any."""
    if closure is not None:
        with torch.enable_grad():
            closure()
