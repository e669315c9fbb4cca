"""The PINN race: how fast CurveBall and the optimizers PINN papers use drive the relative L2
error of physics-informed networks down, on the problems of Dangel, Müller & Zeinhofer
("Kronecker-factored approximate curvature for physics-informed neural networks", NeurIPS
2024, arXiv:2405.15603).

Tasks (:mod:`benchmarks.pdes`): Poisson 2D (2→64→1), heat 1+1D (2→64→1), Poisson 5D
(5→64→1, fresh points every step) and the same with a 5→64→64→48→48→1 network; tanh,
float64, PyTorch's default initialisation. Every loss is L = ½‖r‖², r the residual vector.

Contenders: ``curveball-full-batch`` (``CurveBall(model, **curveball.FULL_BATCH_DEFAULTS)``)
and ``curveball`` (the defaults), stepping on the user's-way residual (``autograd.grad`` on
the collocation points); ENGD with the Gramian (``engd``) or the kernel (``engd-woodbury``)
(:mod:`benchmarks.engd`); Hessian-free (:mod:`benchmarks.hessian_free`); Adam at the best
learning rate of ``--adam-lrs`` (each grid point runs for the whole budget; the grid's
total time is reported); L-BFGS (strong Wolfe, history 100); ``adam-lbfgs``: the best Adam
run's state after ``--adam-fraction`` of the budget, continued by L-BFGS.
Named only, not in a default run: ``curveball-exact`` (:data:`EXACT_GAUSS_NEWTON`).

Every contender starts from the same weights, sees the same points (the same fresh draw at
the same step where points are resampled), and gets the same budget of stepping time
(``--budget`` seconds; one untimed warm-up step on a throwaway copy first, so one-time
costs such as first-call tracing do not count). Only the steps are timed; the errors on
10,000 uniform evaluation points (drawn once per task, separate seed) are measured with the
clock paused, at every step early on, then at geometrically spaced steps and at least every
``budget / 200`` seconds. Per task: the seconds to relative L2 ≤ 1e-3, 1e-4, 1e-5, the final
relative and absolute L2 errors, steps and ms per step, with the published figures beside
them; a plot of relative L2 against stepping time; JSON with every curve.

Example::

    python -m benchmarks.pinn_race --tasks poisson2d --budget 60 --threads 1 \\
        --json out/pinn.json --markdown out/pinn.md --plots out/pinn
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import math
import statistics
import time
import warnings
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import curveball
from benchmarks import common, plots
from benchmarks.engd import ENGD
from benchmarks.hessian_free import HessianFree
from benchmarks.pdes import (
    TASKS,
    FunctionalResidual,
    Points,
    Task,
    half_squared_norm,
    pointwise_residual,
)
from benchmarks.pdes import residual_vector as user_residual

CONTENDERS = ("curveball-pointwise", "curveball-full-batch", "curveball", "engd",
              "engd-woodbury", "hessian-free", "adam", "lbfgs", "adam-lbfgs")  # fmt: skip
"""The contenders of a default run."""

EXACT_GAUSS_NEWTON = {"solver": "exact"}
"""``curveball-exact``, a diagnostic contender (``--contenders curveball-exact``, not in a
default run): ``FULL_BATCH_DEFAULTS`` with these changes, ENGD's damping (a fixed
λ = 1e-10: ``lambda_factor=1`` keeps it) and the dense Gauss-Newton matrix formed afresh
at every step, so that every step is the Gauss-Newton step ENGD takes, shortened by the
line search until it descends. It separates the two halves of the gap to ENGD: the number
of steps a path needs and the cost of a step (the dense J by ``D`` products, against ENGD's
per-point Jacobian)."""

EXTRA = ("curveball-exact",)
"""Contenders that run only when named."""

THRESHOLDS = (1e-3, 1e-4, 1e-5)
EVAL_SEED, BATCH_SEED = 2**60, 2**32
"""Generator seeds: the evaluation points' is ``--seed + EVAL_SEED``, the fixed points'
``--seed``, the fresh points of step k ``(--seed + 1) · BATCH_SEED + k`` (no two collide)."""

Stepper = Callable[[Points], torch.Tensor]
"""One optimizer step on a batch of collocation points; returns the loss before it."""


class Skipped(Exception):
    """A contender that cannot run with this version of the library (the reason)."""


# ------------------------------------------------------------------------- published figures
SOURCE = (
    "Dangel, Müller & Zeinhofer, NeurIPS 2024 (arXiv:2405.15603), Figs. 2–3 and appendix; "
    "the values are the final L2 errors of the best runs' logs in "
    "github.com/f-dangel/kfac-pinns-experiments (kfac_pinns_exp/{}/best_runs)"
)
PUBLISHED = {
    "poisson2d": ("exp09_reproduce_poisson2d", 1000, {
        "ENGD": 6.2e-8, "Hessian-free": 3.2e-7, "KFAC": 3.4e-7, "KFAC*": 2.0e-7,
        "Adam": 9.4e-5, "L-BFGS": 1.8e-4, "SGD": 3.6e-5}),
    "heat1d": ("exp13_reproduce_heat1d", 1000, {
        "ENGD": 3.1e-8, "Hessian-free": 6.2e-7, "KFAC": 1.9e-6, "KFAC*": 8.8e-7,
        "Adam": 1.2e-4, "L-BFGS": 2.7e-4, "SGD": 2.8e-4}),
    "poisson5d": ("exp10_reproduce_poisson5d", 3000, {
        "ENGD": 5.6e-8, "Hessian-free": 6.1e-6, "KFAC": 4.9e-5, "KFAC*": 2.7e-6,
        "Adam": 1.1e-3, "L-BFGS": 8.9e-4, "SGD": 2.6e-3}),
    "poisson5d-deep": ("exp16_poisson5d_deepwide", 3000, {
        "ENGD (per layer)": 4.0e-4, "Hessian-free": 1.3e-4, "KFAC": 8.5e-4, "KFAC*": 6.3e-4,
        "Adam": 3.8e-3, "L-BFGS": 3.0e-3, "SGD": 9.7e-3}),
}  # fmt: skip
"""Per task: the experiment folder, the runs' seconds and the absolute L2 error (RMS of
u − u* on 9,000 or 30,000 evaluation points, float64, RTX 6000 GPU) by optimizer. ENGD is
the full Gramian except on the deep net, where the paper's full-Gramian ENGD ran a smaller
net (64-48-32-16), so only the per-layer one is listed."""

PUBLISHED_AS = {"engd": "ENGD", "engd-woodbury": "ENGD", "hessian-free": "Hessian-free",
                "adam": "Adam", "lbfgs": "L-BFGS"}  # fmt: skip


# ------------------------------------------------------------------------------ the problem
@dataclass
class Problem:
    """One task on one device: the initial network, the points, the evaluation set."""

    task: Task
    init: nn.Module
    eval_x: torch.Tensor
    eval_u: torch.Tensor
    fixed: Points | None
    seed: int

    @classmethod
    def create(cls, task: Task, args: Namespace) -> Problem:
        device = torch.device(args.device)
        torch.manual_seed(args.seed)
        init = task.build().to(device=device, dtype=torch.float64)
        x = torch.rand(
            args.eval_points,
            task.pde.dim,
            dtype=torch.float64,
            generator=torch.Generator().manual_seed(args.seed + EVAL_SEED),
        )
        x = x.to(device)
        problem = cls(task, init, x, task.pde.exact(x), None, args.seed)
        if not task.resample:
            problem.fixed = problem._draw(torch.Generator().manual_seed(args.seed))
        return problem

    def _draw(self, generator: torch.Generator) -> Points:
        points = self.task.pde.sample(self.task.counts, generator)
        return {t: x.to(self.eval_x.device) for t, x in points.items()}

    def batch(self, step: int) -> Points:
        """The points of step ``step`` (0-based): the fixed set, or a fresh draw seeded by
        the step, so every contender sees the same sequence."""
        if self.fixed is not None:
            return self.fixed
        return self._draw(torch.Generator().manual_seed((self.seed + 1) * BATCH_SEED + step))

    def residual(self, model: nn.Module, points: Points) -> torch.Tensor:
        """The user's-way residual vector (``autograd.grad`` on the points)."""
        return user_residual(self.task.pde, model, points)

    @torch.no_grad()
    def errors(self, model: nn.Module) -> tuple[float | None, float | None]:
        """(relative, absolute) L2 errors on the evaluation points: ‖u − u*‖/‖u*‖ and the
        RMS of u − u* (a Monte Carlo estimate of the L2(Ω) norm, |Ω| = 1); None if not
        finite."""
        e = model(self.eval_x).squeeze(-1) - self.eval_u
        rel, absolute = float(e.norm() / self.eval_u.norm()), float(e.square().mean().sqrt())
        return (rel, absolute) if math.isfinite(rel) and math.isfinite(absolute) else (None, None)


# ------------------------------------------------------------------------------ contenders
def preset(name: str) -> dict:
    """The library's preset ``curveball.<name>`` (raises :class:`Skipped` if it has none)."""
    settings = getattr(curveball, name, None)
    if settings is None:
        raise Skipped(f"curveball.{name} does not exist yet in this version of the library")
    return settings


def curveball_stepper(
    model: nn.Module, problem: Problem, settings: dict, pointwise: bool = False
) -> Stepper:
    """CurveBall with ``settings``: ``opt.step(model_fn, ½‖r‖²)`` on the user's-way residual,
    or (``pointwise``) on the residual written point by point
    (:class:`curveball.pointwise.PointwiseResidual`), which brings its Jacobian."""
    opt = curveball.CurveBall(model, **settings)

    def step(points: Points) -> torch.Tensor:
        if pointwise:
            model_fn = pointwise_residual(problem.task.pde, model, points)
        else:
            model_fn = lambda: problem.residual(model, points)  # noqa: E731
        loss, _ = opt.step(model_fn, half_squared_norm)
        return loss

    step.optimizer = opt  # type: ignore[attr-defined]  # the race notes its engine and skips
    return step


def engd_stepper(model: nn.Module, problem: Problem, form: str, damping: float) -> Stepper:
    """ENGD: the Jacobian by per-sample reverse mode (the functional residual), the line
    search on the user's-way residual (the faster to evaluate)."""
    opt = ENGD(model.parameters(), damping=damping, form=form)

    def step(points: Points) -> torch.Tensor:
        functional = FunctionalResidual(problem.task.pde, model, points)
        return opt.step(
            lambda: problem.residual(model, points),
            lambda: functional.jacobian(functional.parameters()),
        )

    return step


def hessian_free_stepper(model: nn.Module, problem: Problem, args: Namespace) -> Stepper:
    """Hessian-free on the user's-way residual (Gauss-Newton products by reverse mode)."""
    opt = HessianFree(model.parameters(), damping=args.hf_damping, max_cg=args.hf_max_cg)
    return lambda points: opt.step(lambda: problem.residual(model, points))


def gradient_stepper(opt: torch.optim.Optimizer, model: nn.Module, problem: Problem) -> Stepper:
    """A first-order step (Adam) on the loss's gradient."""

    def step(points: Points) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = half_squared_norm(problem.residual(model, points))
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def lbfgs_stepper(model: nn.Module, problem: Problem) -> Stepper:
    """``torch.optim.LBFGS`` (strong Wolfe line search, history 100), full batch; one call
    of ``step`` runs up to its default 20 iterations on the step's points."""
    opt = torch.optim.LBFGS(model.parameters(), line_search_fn="strong_wolfe", history_size=100)

    def step(points: Points) -> torch.Tensor:
        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = half_squared_norm(problem.residual(model, points))
            loss.backward()
            return loss

        return opt.step(closure).detach()

    return step


def _check_gramian_size(model: nn.Module, limit: int) -> None:
    """ENGD's D × D Gramian and its SVD-based solve cost O(N D² + D³): one step on the
    10,065-parameter net took 585 s on one CPU core here. Above ``limit`` parameters that
    contender is skipped (the kernel form, ``engd-woodbury``, is the one for large nets)."""
    size = common.count_parameters(model)
    if size > limit:
        raise Skipped(
            f"the {size:,} × {size:,} Gramian is over --engd-max-gramian {limit:,} (a step "
            "takes minutes on a CPU); engd-woodbury is this task's ENGD"
        )


def make_stepper(
    name: str, model: nn.Module, problem: Problem, args: Namespace, lr: float | None = None
) -> Stepper:
    """The contender ``name``'s step for ``model`` (raises :class:`Skipped` if it cannot run)."""
    changes = dict(args.curveball_set)  # --curveball-set, on top of each CurveBall contender's
    if name == "curveball-full-batch":
        return curveball_stepper(model, problem, {**preset("FULL_BATCH_DEFAULTS"), **changes})
    if name == "curveball":
        return curveball_stepper(model, problem, changes)
    if name == "curveball-exact":
        settings = {**preset("FULL_BATCH_DEFAULTS"), **EXACT_GAUSS_NEWTON, **changes}
        return curveball_stepper(model, problem, settings)
    if name == "curveball-pointwise":
        settings = {**preset("FULL_BATCH_DEFAULTS"), **changes}
        return curveball_stepper(model, problem, settings, pointwise=True)
    if name == "engd":
        _check_gramian_size(model, args.engd_max_gramian)
        return engd_stepper(model, problem, "gramian", args.engd_damping)
    if name == "engd-woodbury":
        return engd_stepper(model, problem, "woodbury", args.engd_damping)
    if name == "hessian-free":
        return hessian_free_stepper(model, problem, args)
    if name == "adam":
        return gradient_stepper(torch.optim.Adam(model.parameters(), lr=lr), model, problem)
    if name == "lbfgs":
        return lbfgs_stepper(model, problem)
    raise KeyError(name)


# ------------------------------------------------------------------------------ training
@dataclass
class Run:
    """One contender's run: its curve of ``[step, seconds, rel. L2, abs. L2]``."""

    name: str
    lr: float | None = None
    curve: list[list] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    first_loss: float | None = None  # the loss at the initial weights (the first step's)
    last_loss: float | None = None  # the loss before the last step
    error: str | None = None
    notes: dict = field(default_factory=dict)
    snapshot: dict | None = None  # the state after a fraction of the budget (adam-lbfgs)


class Schedule:
    """When to evaluate: after each of the first ``first`` steps, then at steps growing
    geometrically by ``growth``, and whenever ``interval`` seconds of stepping have passed
    since the last evaluation."""

    def __init__(self, interval: float, step: int = 0, first: int = 10, growth: float = 1.2):
        self.interval, self.first, self.growth = interval, first, growth
        self.next_step, self.next_time = max(first, step) + 1, 0.0

    def due(self, step: int, seconds: float) -> bool:
        if step > self.first and step < self.next_step and seconds < self.next_time:
            return False
        self.next_step = max(step + 1, math.ceil(step * self.growth))
        self.next_time = seconds + self.interval
        return True


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}"


def _timed(step: Stepper, points: Points, device: torch.device) -> tuple[float, float]:
    common.sync(device)
    start = time.perf_counter()
    loss = step(points)
    common.sync(device)
    seconds = time.perf_counter() - start
    return seconds, float(loss)


def _record(run: Run, model: nn.Module, problem: Problem) -> None:
    run.curve.append([run.steps, run.seconds, *problem.errors(model)])


def _note_curveball(run: Run, step: Stepper) -> None:
    last = getattr(getattr(step, "optimizer", None), "last", None)
    if last is None:
        return
    run.notes["engine"] = last.engine
    if last.skipped:
        skipped = run.notes.setdefault("skipped_steps", {})
        skipped[last.reason] = skipped.get(last.reason, 0) + 1


def train(
    run: Run,
    model: nn.Module,
    step: Stepper,
    problem: Problem,
    budget: float,
    snapshot_at: float | None = None,
) -> Run:
    """Step until ``run.seconds`` reaches ``budget``, evaluating on the schedule (untimed).
    An exception or a non-finite loss ends the run, recorded in ``run.error``."""
    device = problem.eval_x.device
    schedule = Schedule(budget / 200, run.steps)
    if not run.curve:
        _record(run, model, problem)
    while run.seconds < budget:
        points = problem.batch(run.steps)
        try:
            seconds, loss = _timed(step, points, device)
        except Exception as error:  # a contender that fails is listed with the reason
            run.error = _describe(error)
            break
        run.steps, run.seconds, run.last_loss = run.steps + 1, run.seconds + seconds, loss
        run.first_loss = loss if run.first_loss is None else run.first_loss
        run.step_seconds.append(seconds)
        _note_curveball(run, step)
        if not math.isfinite(loss):
            run.error = f"non-finite loss at step {run.steps}"
            break
        if schedule.due(run.steps, run.seconds):
            _record(run, model, problem)
        if snapshot_at is not None and run.snapshot is None and run.seconds >= snapshot_at:
            _snapshot(run, model, problem)
    if run.curve[-1][0] != run.steps:
        _record(run, model, problem)
    return run


def _snapshot(run: Run, model: nn.Module, problem: Problem) -> None:
    if run.curve[-1][0] != run.steps:
        _record(run, model, problem)
    run.snapshot = {
        "model": copy.deepcopy(model.state_dict()),
        "steps": run.steps,
        "seconds": run.seconds,
        "curve": copy.deepcopy(run.curve),
    }


def warm_up(name: str, problem: Problem, args: Namespace, lr: float | None = None) -> None:
    """One untimed step of a throwaway copy (first-call costs: tracing, allocation)."""
    model = copy.deepcopy(problem.init)
    with contextlib.suppress(Exception):  # the timed run records a failure
        make_stepper(name, model, problem, args, lr)(problem.batch(0))


def run_contender(
    name: str,
    problem: Problem,
    args: Namespace,
    lr: float | None = None,
    snapshot_at: float | None = None,
) -> Run:
    """A contender's whole run from the shared initial weights."""
    run = Run(name, lr)
    model = copy.deepcopy(problem.init)
    try:
        step = make_stepper(name, model, problem, args, lr)
    except Skipped as reason:
        run.error = f"skipped: {reason}"
        return run
    except Exception as error:
        run.error = _describe(error)
        return run
    if args.warmup:
        warm_up(name, problem, args, lr)
    return train(run, model, step, problem, args.budget, snapshot_at)


def _final_rel(run: Run) -> float:
    value = run.curve[-1][2] if run.curve else None
    return math.inf if value is None else value


def adam_grid(problem: Problem, args: Namespace) -> dict:
    """Adam at every learning rate of ``--adam-lrs`` for the whole budget; the best has the
    lowest final relative L2. Each run keeps its state after ``--adam-fraction`` of the
    budget, for ``adam-lbfgs``."""
    runs = [
        run_contender("adam", problem, args, lr, args.adam_fraction * args.budget)
        for lr in args.adam_lrs
    ]
    best = min(runs, key=_final_rel)
    return {"runs": runs, "best": best, "total_seconds": sum(r.seconds for r in runs)}


def adam_then_lbfgs(problem: Problem, grid: dict, args: Namespace) -> Run:
    """The best Adam run's state after ``--adam-fraction`` of the budget, continued by
    L-BFGS until the budget is spent."""
    best = grid["best"]
    run = Run("adam-lbfgs", best.lr)
    if best.snapshot is None:
        run.error = best.error or "the best Adam run stopped before the switch to L-BFGS"
        return run
    model = copy.deepcopy(problem.init)
    model.load_state_dict(best.snapshot["model"])
    run.steps, run.seconds = best.snapshot["steps"], best.snapshot["seconds"]
    run.first_loss = best.first_loss
    run.curve = copy.deepcopy(best.snapshot["curve"])
    run.notes["switch"] = {"step": run.steps, "seconds": run.seconds}
    if args.warmup:
        warm_up("lbfgs", problem, args)
    return train(run, model, lbfgs_stepper(model, problem), problem, args.budget)


# ------------------------------------------------------------------------------ results
def time_to(curve: list[list], threshold: float) -> float | None:
    """The stepping seconds at the first evaluation with relative L2 ≤ ``threshold``."""
    return next((s for _, s, rel, _ in curve if rel is not None and rel <= threshold), None)


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def row_of(run: Run) -> dict:
    """A run as a table row (JSON-ready): times to thresholds, final errors, its curve."""
    last = run.curve[-1] if run.curve else [0, 0.0, None, None]
    return {
        "contender": run.name,
        "error": run.error,
        "lr": run.lr,
        "steps": run.steps,
        "seconds": run.seconds,
        "ms_per_step": statistics.median(run.step_seconds) * 1e3 if run.step_seconds else None,
        "final_rel_l2": last[2],
        "final_abs_l2": last[3],
        "first_loss": _finite_or_none(run.first_loss),
        "final_loss": _finite_or_none(run.last_loss),
        "time_to": {f"{t:.0e}": time_to(run.curve, t) for t in THRESHOLDS},
        "notes": run.notes,
        "curve": run.curve,
        "published_abs_l2": None,
    }


def race_task(task: Task, args: Namespace) -> dict:
    """Every contender on one task; the rows in the order of ``--contenders``."""
    problem = Problem.create(task, args)
    grid = None
    if {"adam", "adam-lbfgs"} & set(args.contenders):
        grid = adam_grid(problem, args)
    rows = []
    for name in args.contenders:
        if name == "adam":
            run = grid["best"]
        elif name == "adam-lbfgs":
            run = adam_then_lbfgs(problem, grid, args)
        else:
            run = run_contender(name, problem, args)
        rows.append(row_of(run))
        if run.error is not None and run.error.startswith("skipped"):
            print(f"  {task.name}: {name} {run.error}", flush=True)
        elif args.verbose:
            print(f"  {task.name}: {name} done, {run.steps} steps", flush=True)
    return summarise(task, problem, rows, grid)


def summarise(task: Task, problem: Problem, rows: list[dict], grid: dict | None) -> dict:
    folder, seconds, figures = PUBLISHED.get(task.name, (None, None, {}))
    for row in rows:
        row["published_abs_l2"] = figures.get(PUBLISHED_AS.get(row["contender"], ""))
    adam = None
    if grid is not None:
        adam = {
            "lrs": [r.lr for r in grid["runs"]],
            "final_rel_l2": {
                f"{r.lr:g}": r.curve[-1][2] if r.curve else None for r in grid["runs"]
            },
            "errors": {f"{r.lr:g}": r.error for r in grid["runs"] if r.error},
            "best_lr": grid["best"].lr,
            "total_seconds": grid["total_seconds"],
        }
    return {
        "task": task.name,
        "description": task.describe(),
        "parameters": common.count_parameters(problem.init),
        "eval_points": len(problem.eval_x),
        "adam_grid": adam,
        "rows": rows,
        "published": {
            "source": SOURCE.format(folder) if folder else None,
            "seconds": seconds,
            "abs_l2": figures,
        },
    }


# ------------------------------------------------------------------------------ reporting
def _sci(value: float | None) -> str:
    return "—" if value is None else f"{value:.1e}"


def _secs(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _table_row(row: dict) -> str:
    times = " | ".join(_secs(row["time_to"][f"{t:.0e}"]) for t in THRESHOLDS)
    ms = "—" if row["ms_per_step"] is None else f"{row['ms_per_step']:.1f}"
    name = row["contender"] + (f" (lr {row['lr']:g})" if row["lr"] is not None else "")
    notes = [row["error"]] if row["error"] else []
    if "engine" in row["notes"]:
        notes.append(f"CurveBall engine: {row['notes']['engine']}")
    if row["notes"].get("skipped_steps"):
        notes.append(f"skipped steps: {row['notes']['skipped_steps']}")
    if "switch" in row["notes"]:
        switch = row["notes"]["switch"]
        notes.append(
            f"L-BFGS from {switch['seconds']:.1f} s (step {switch['step']}); ms/step of it"
        )
    note = "; ".join(notes)
    return (
        f"| {name} | {times} | {_sci(row['final_rel_l2'])} | {_sci(row['final_abs_l2'])} "
        f"| {row['steps']} | {ms} | {_sci(row['published_abs_l2'])} | {note} |"
    )


def _grid_line(adam: dict | None) -> str:
    if adam is None:
        return ""
    finals = ", ".join(f"lr {lr}: {_sci(v)}" for lr, v in adam["final_rel_l2"].items())
    return (
        f"\n\nAdam grid (final rel. L2): {finals}; best lr {adam['best_lr']:g}; the grid's "
        f"total stepping time {adam['total_seconds']:.1f} s."
    )


def _published_line(result: dict) -> str:
    published = result["published"]
    if not published["abs_l2"]:
        return ""
    figures = ", ".join(f"{k} {v:.1e}" for k, v in published["abs_l2"].items())
    return (
        f"\n\nPublished absolute L2 errors after {published['seconds']:,} s on a GPU (best "
        f"run of each optimizer's tuning): {figures}. Source: {published['source']}."
    )


def markdown(results: list[dict], settings: dict) -> str:
    """One table per task, then the Adam grid and the published figures."""
    header = (
        "| contender | s to rel. L2 ≤ 1e-3 | ≤ 1e-4 | ≤ 1e-5 | final rel. L2 | final abs. L2 "
        "| steps | ms/step | published abs. L2 | note |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    )
    parts = []
    threads = settings["threads"] or torch.get_num_threads()
    for r in results:
        caption = (
            f"### {r['task']}: {r['description']} (D = {r['parameters']:,})\n\n"
            f"Budget {settings['budget']:g} s of stepping time per contender "
            f"({settings['device']}, float64, threads: {threads}); relative L2 "
            f"‖u − u*‖/‖u*‖ and absolute L2 (RMS of u − u*) on {r['eval_points']:,} uniform "
            "evaluation points. Published: absolute L2 of Dangel et al. (2024), see below."
        )
        if settings.get("curveball_set"):
            changes = ", ".join(f"`{k}={v!r}`" for k, v in settings["curveball_set"])
            caption += f" CurveBall contenders with {changes}."
        lines = "\n".join(_table_row(row) for row in r["rows"])
        parts.append(
            f"{caption}\n\n{header}\n{lines}{_grid_line(r['adam_grid'])}{_published_line(r)}"
        )
    return "\n\n".join(parts) + "\n"


def plot(results: list[dict], folder: str) -> None:
    """Relative L2 (log) against stepping time, one line per contender, a file per task."""
    plt = plots.pyplot()
    for r in results:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row in r["rows"]:
            points = [(s, rel) for _, s, rel, _ in row["curve"] if rel is not None]
            if points:
                style = {"lw": 2.0} if row["contender"].startswith("curveball") else {"lw": 1.2}
                ax.plot(*zip(*points, strict=True), label=row["contender"], **style)
        for t in THRESHOLDS:
            ax.axhline(t, color="k", ls=":", lw=0.6)
        plots.log_axes(ax, "stepping time (s)", "relative L2 error")
        ax.legend(fontsize=7)
        ax.set_title(f"{r['task']} (D = {r['parameters']:,})")
        plots.save(fig, folder, r["task"])


# ------------------------------------------------------------------------------ the CLI
def setting(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` as ``(name, value)``: a Python literal (``10``, ``1e-3``, ``False``),
    else the string itself (``auto``)."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def parse_args(argv: list[str] | None) -> Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS + EXTRA)
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="stepping seconds per contender (default 300; 1 with --quick)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 s budgets, a tenth of the points, 1,000 evaluation points",
    )
    p.add_argument("--adam-lrs", nargs="+", type=float, default=[1e-4, 1e-3, 1e-2])
    p.add_argument(
        "--adam-fraction",
        type=float,
        default=0.5,
        help="adam-lbfgs: the fraction of the budget spent in Adam",
    )
    p.add_argument("--engd-damping", type=float, default=1e-10)
    p.add_argument(
        "--engd-max-gramian",
        type=int,
        default=4096,
        help="skip engd (the D × D Gramian) on nets with more parameters",
    )
    p.add_argument(
        "--curveball-set",
        nargs="+",
        type=setting,
        default=[],
        metavar="NAME=VALUE",
        help="constructor keywords over every CurveBall contender's settings (an ablation: "
        "precondition_interval=10 precondition_rank=64); values are Python literals or strings",
    )
    p.add_argument("--hf-damping", type=float, default=1.0, help="Hessian-free's initial λ")
    p.add_argument("--hf-max-cg", type=int, default=250)
    p.add_argument("--eval-points", type=int, default=None, help="default 10,000")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--plots", default=None)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 1.0 if args.quick else 300.0
    if args.eval_points is None:
        args.eval_points = 1000 if args.quick else 10_000
    if args.budget <= 0:
        p.error(f"--budget: expected positive seconds, got {args.budget}")
    if not 0 < args.adam_fraction < 1:
        p.error(f"--adam-fraction: expected a fraction in (0, 1), got {args.adam_fraction}")
    return args


def run(argv: list[str] | None = None) -> list[dict]:
    """Race every task; print, and write the JSON, markdown and plots asked for."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = vars(args)
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.tasks:
            task = TASKS[name].shrunk(0.1) if args.quick else TASKS[name]
            results.append(race_task(task, args))
            print(markdown(results[-1:], settings), flush=True)
    common.write_json(args.json, {"settings": settings, "results": results})
    common.write_markdown(args.markdown, markdown(results, settings))
    if args.plots:
        plot(results, args.plots)
    return results


if __name__ == "__main__":
    run()
