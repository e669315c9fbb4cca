"""The hyper-parameters: the paper's settings, their checks, and which may differ per group.

Every hyper-parameter lives in ``param_groups`` (so that ``state_dict()`` carries
it and schedulers see it), as in ``torch.optim``. Only :data:`PER_GROUP` may
differ between parameter groups; :func:`shared` checks that all others agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from curveball._curvature.engine_choice import MODES

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
    "inner_steps": 1,
    "solver": "curveball",
    "line_search": False,
}
"""Constructor keywords with which ``CurveBall(model, **PAPER_DEFAULTS)`` is the authors'
method (Henriques et al., ICCV 2019), whatever the defaults become. (One guard applies to
every setting: a trust-region test whose predicted and measured changes are both within
:data:`~curveball._trust_region.ROUNDING_UNITS` units of the loss's precision leaves λ as
it is.)"""

FULL_BATCH_DEFAULTS: dict[str, Any] = {
    "lambd": 1e-2,
    "lambda_factor": 2.0 / 3.0,
    "lambda_interval": 1,
    "lambda_min": 0.0,
    "reject_uphill": True,
    "line_search": True,
    "precondition": "auto",
    "precondition_interval": "auto",
    "precondition_rank": "auto",
    "inner_steps": 10,
    "solver": "auto",
    "forward_mode": "fastest",
}
"""Constructor keywords for a batch that comes every step (physics-informed networks on
fixed or resampled collocation points, full-batch regression): ``CurveBall(model,
**FULL_BATCH_DEFAULTS)``. Where the model function brings its Jacobian (a residual written
point by point, :class:`curveball.pointwise.PointwiseResidual`) and there are at most 2,048
parameters, every step solves its Gauss-Newton system exactly (``solver="exact"``, the step
of energy natural gradient descent; :data:`EXACT_DAMPING`). Otherwise: ten
conjugate-gradient iterations on each step's model (:mod:`curveball._inner_loop`),
preconditioned by the dense Gauss-Newton matrix up to 2,048 parameters
(:mod:`curveball._gauss_newton`), by its Nyström sketch up to 131,072
(:mod:`curveball._nystrom`) and by the diagonal beyond, formed on the schedule of
:data:`AUTO_SCHEDULE` (every step at rank 128 where the Jacobian is at hand, every ten
steps at rank 64 where its products cost passes), with the Levenberg-Marquardt rule
(λ × 2/3 or × 3/2, from 0.01, no floor). Both: a trust-region test at every step and a
backtracking line search before a rejection; the faster of forward mode and double
backward, measured."""

NAMES = (*PAPER_DEFAULTS, "precondition_decay", "precondition_eps", "precondition_interval",
         "precondition_rank")  # fmt: skip
"""Every hyper-parameter of the constructor (each lives in ``param_groups``)."""

PER_GROUP = ("lr", "weight_decay")
"""Hyper-parameters that may differ between parameter groups; all others are global."""

PRECONDITIONERS = (False, True, "diagonal", "gauss-newton", "nystrom", "auto")
"""The values of ``precondition``: none, the diagonal (``True`` is ``"diagonal"``),
the dense Gauss-Newton matrix (:mod:`curveball._gauss_newton`), its randomized low-rank
(Nyström) approximation (:mod:`curveball._nystrom`), or ``"auto"``: the dense one up to
:data:`DENSE_LIMIT` parameters, the Nyström sketch up to :data:`NYSTROM_LIMIT`, the
diagonal beyond."""

DENSE_LIMIT = 2048
"""The largest parameter count (real numbers) for which ``precondition="auto"`` forms the
dense Gauss-Newton matrix: ``D`` forward-mode passes and a ``D × D`` eigendecomposition,
repaid over ``precondition_interval`` steps."""

AUTO_SCHEDULE: dict[bool, tuple[int, int]] = {True: (1, 128), False: (10, 64)}
"""``(precondition_interval, precondition_rank)`` that ``"auto"`` takes, keyed by whether
the step's products come from the Jacobian held as a matrix
(:func:`curveball._curvature.jacobian_matrix.takes_matrix`). With ``J`` at hand, ``G`` or
its sketch costs matrix products and no passes, so it is formed afresh at every step, and
the sketch takes 128 products: on the PINN race's 10,065-parameter network, 150 s of the
preset end at a relative L2 of 1.0e-3, against 6.6e-3 with a rank-64 sketch every ten steps,
3.1e-3 with one every step, and 1.1e-3 with a rank-256 one every step (see the changelog).
Without ``J``, each product is a pass over the batch, and the matrix is kept for ten steps."""

NYSTROM_LIMIT = 131_072
"""The largest parameter count for which ``precondition="auto"`` sketches the Gauss-Newton
matrix (:mod:`curveball._nystrom`): ``s`` products every ``precondition_interval`` steps and
an ``s × D`` float64 sketch (64 MiB at ``s = 64``, 128 MiB at 128). Beyond it ``"auto"`` takes the
diagonal, whose cost stays one pass over the parameters. (On the PINN race's
10,065-parameter network the sketch does better than the diagonal at equal time:
``docs/results/pinn-race.md``.)"""

SOLVERS = ("curveball", "conjugate", "exact", "auto")
"""The inner solvers: ``"curveball"`` and ``"conjugate"`` (:mod:`curveball._inner_loop`),
``"exact"`` (the damped Gauss-Newton system solved outright at every step, see
:data:`EXACT_DAMPING`) and ``"auto"``: ``"exact"`` where the model function brings its
Jacobian (:class:`curveball.pointwise.PointwiseResidual`), the parameters are at most
:data:`DENSE_LIMIT` and ``precondition`` allows the dense matrix, ``"conjugate"``
otherwise."""

EXACT_DAMPING = 1e-10
"""The damping of ``solver="exact"``, held fixed: the regularisation of energy natural
gradient descent's Gramian solve (Müller & Zeinhofer, ICML 2023). Each step is then the
Gauss-Newton step of least squares, ``z = −(G + 10⁻¹⁰ I)⁻¹ g``, safeguarded by the trust-region
test and the line search rather than by λ; the trust-region rule's λ is left as it was, for
the steps of the other solvers."""


def solver(name: str, size: int, precondition: bool | str, jacobian_given: bool) -> str:
    """The solver that ``solver=name`` takes for a step with ``size`` parameters (real
    numbers), given whether the model function brings its Jacobian."""
    if name != "auto":
        return name
    dense = precondition in ("auto", "gauss-newton") and size <= DENSE_LIMIT
    return "exact" if jacobian_given and dense else "conjugate"


def _finite_non_negative(h: dict[str, Any], names: Sequence[str]) -> None:
    for name in names:
        value = h[name]
        if not isinstance(value, int | float) or not value >= 0.0 or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite value >= 0, got {value!r}")


def _positive_integers(
    h: dict[str, Any], names: Sequence[str], automatic: Sequence[str] = ()
) -> None:
    for name in names:
        value = h[name]
        if name in automatic and value == "auto":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            also = " or 'auto'" if name in automatic else ""
            raise ValueError(f"{name}: expected an integer >= 1{also}, got {value!r}")


def schedule(interval: int | str, rank: int | str, matrix: bool) -> tuple[int, int]:
    """``(precondition_interval, precondition_rank)``, each ``"auto"`` replaced by its value
    in :data:`AUTO_SCHEDULE` (``matrix``: the step's products come from ``J`` held as a
    matrix)."""
    auto_interval, auto_rank = AUTO_SCHEDULE[matrix]
    return (
        auto_interval if interval == "auto" else int(interval),
        auto_rank if rank == "auto" else int(rank),
    )


def _booleans(h: dict[str, Any], names: Sequence[str]) -> None:
    for name in names:
        if not isinstance(h[name], bool):
            raise ValueError(f"{name}: expected True or False, got {h[name]!r}")


def preconditioner(precondition: bool | str, size: int) -> str | None:
    """The preconditioner that ``precondition`` asks for with ``size`` parameters (real
    numbers): ``"diagonal"``, ``"gauss-newton"``, ``"nystrom"`` or ``None``."""
    if precondition == "auto":
        if size <= DENSE_LIMIT:
            return "gauss-newton"
        return "nystrom" if size <= NYSTROM_LIMIT else "diagonal"
    if precondition is True or precondition == "diagonal":
        return "diagonal"
    return precondition if precondition in ("gauss-newton", "nystrom") else None


def check(h: dict[str, Any]) -> None:
    """Clear errors for out-of-range hyper-parameters (of the constructor or a group)."""
    _finite_non_negative(h, ("lr", "lambd", "weight_decay", "lambda_min"))
    if not 0.0 < h["lambda_factor"] <= 1.0:
        raise ValueError(f"lambda_factor: expected a value in (0, 1], got {h['lambda_factor']}")
    thresholds = h["lambda_thresholds"]
    if len(tuple(thresholds)) != 2 or not thresholds[0] < thresholds[1]:
        raise ValueError(
            f"lambda_thresholds: expected (low, high) with low < high, got {thresholds}"
        )
    _positive_integers(
        h,
        (
            "lambda_interval",
            "step_size_interval",
            "inner_steps",
            "precondition_interval",
            "precondition_rank",
        ),
        automatic=("precondition_interval", "precondition_rank"),
    )
    if h["solver"] not in SOLVERS:
        raise ValueError(f"solver: expected one of {SOLVERS}, got {h['solver']!r}")
    for name in ("momentum", "beta"):
        value = h[name]
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name}: expected None (automatic) or a finite number, got {value}")
    _booleans(h, ("reject_uphill", "line_search"))
    value = h["precondition"]
    if not (isinstance(value, bool) or (isinstance(value, str) and value in PRECONDITIONERS)):
        raise ValueError(
            f"precondition: expected True, False, 'diagonal', 'gauss-newton', 'nystrom' or "
            f"'auto', got "
            f"{h['precondition']!r}"
        )
    decay, eps = h["precondition_decay"], h["precondition_eps"]
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"precondition_decay: expected a value in [0, 1), got {decay}")
    if not eps > 0.0 or not math.isfinite(eps):
        raise ValueError(f"precondition_eps: expected a finite value > 0, got {eps}")
    fraction = h["curvature_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise ValueError(f"curvature_fraction: expected a number in (0, 1], got {fraction!r}")
    if fraction < 1 and h["solver"] == "exact":
        raise ValueError(
            "curvature_fraction < 1 and solver='exact' do not combine: the exact solve is on "
            "the whole batch's Gauss-Newton matrix"
        )
    if fraction < 1 and h["inner_steps"] > 1:
        raise ValueError(
            "curvature_fraction < 1 and inner_steps > 1 do not combine: the inner iterations "
            "solve the whole batch's model"
        )


def shared(groups: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """The first group, after checking that the global hyper-parameters ``names`` (all but
    :data:`PER_GROUP`) are equal in every group."""
    first = groups[0]
    global_names = [name for name in names if name not in PER_GROUP]
    for index, group in enumerate(groups[1:], start=1):
        for name in global_names:
            value = first.get(name)
            if group.get(name) != value:
                raise ValueError(
                    f"param_groups[{index}]['{name}']: {group.get(name)!r} differs from "
                    f"param_groups[0]['{name}'] = {value!r}; only {PER_GROUP} may differ "
                    "between groups"
                )
    return first


def module_and_params(params: Any, model: nn.Module | None, forward_mode: str) -> tuple[Any, Any]:
    """The constructor's ``(params, model)``: a module given as ``params`` is both."""
    ddp = nn.parallel.DistributedDataParallel
    if isinstance(params, ddp) or isinstance(model, ddp):
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
    return params, model


def check_parameters(params: Sequence[torch.Tensor]) -> None:
    """Refuse sparse and integer parameters; a complex one is its (real, imaginary) pair."""
    for p in params:
        if p.is_sparse or p.layout != torch.strided:
            raise ValueError("params: sparse parameters are not supported")
        if not (p.is_floating_point() or p.is_complex()):
            raise ValueError(f"params: expected floating-point parameters, got {p.dtype}")


def check_sparse_modules(model: nn.Module) -> None:
    """Sparse gradients cannot be averaged into Δz: refuse them by module name."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.sparse:
            raise ValueError(
                f"model: module {name or type(module).__name__!r} ({type(module).__name__} with "
                "sparse=True) produces sparse gradients, which CurveBall does not support; "
                "construct it with sparse=False"
            )
