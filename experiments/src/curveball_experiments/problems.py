"""The two small problems of the paper and their experiments.

* ``rosenbrock``: ``f(x, y) = (1 - x)² + 100 ε (y - x²)²`` written as the residuals
  ``r = [1 - x, 10 sqrt(ε) (y - x²)]`` with the loss ``Σ r²``; ``ε = 1``
  (deterministic), ``ε ~ U[0, 1]`` or ``ε ~ U[0, 3]`` drawn afresh at every iteration.
  ``(1, 1)`` minimises every sample. Metric: iterations until
  ``|(x, y) - (1, 1)| < 1e-4``.
* ``linear``: the degenerate two-layer linear network ``E |W1 W2 x - A x|²`` with
  ``x ~ N(0, I)`` drawn afresh at every iteration and ``A`` of condition number 1e5.
  Metric: iterations until ``|W1 W2 - A|²_F / |A|²_F < 1e-3``.

Every optimizer sees the same start point and the same random draws for a given
seed. CurveBall, L-BFGS and Levenberg-Marquardt run one seed at a time on a small
``nn.Module`` whose forward returns the residuals. SGD and Adam are tuned over a
learning-rate grid; all grid points and seeds run at once as independent copies
(:class:`~curveball_experiments.optimizers.GridSGD`, ``GridAdam``), which is what
makes the search affordable. Everything is float64.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curveball_experiments import optimizers
from curveball_experiments.report import Report, progress

DTYPE = torch.float64
CAP = 10_000
"""Iteration cap of the small problems (a run that has not converged counts as CAP)."""


class SmallProblem:
    """A least-squares problem with a known minimiser and fresh random draws."""

    name: str
    tol: float
    error_name: str
    param_names: tuple[str, ...]
    residual_dims: int

    def initial(self, seed: int) -> tuple[Tensor, ...]:
        """Start point for ``seed`` (float64, CPU)."""
        raise NotImplementedError

    def draw_chunk(self, generator: torch.Generator, count: int) -> Tensor:
        """``count`` consecutive draws (leading dimension ``count``)."""
        raise NotImplementedError

    def residuals(self, params: Sequence[Tensor], draw: Tensor) -> Tensor:
        """Residuals; leading dimensions of ``params`` index independent copies."""
        raise NotImplementedError

    def error(self, params: Sequence[Tensor]) -> Tensor:
        """Convergence measure per copy (compared with ``tol``)."""
        raise NotImplementedError

    def objective(self, params: Sequence[Tensor]) -> Tensor:
        """Expected loss per copy (what the plots show)."""
        raise NotImplementedError

    def loss_per_copy(self, residuals: Tensor) -> Tensor:
        """``Σ r²`` over the residual dimensions of each copy."""
        return residuals.pow(2).sum(dim=tuple(range(-self.residual_dims, 0)))


@dataclass
class Rosenbrock(SmallProblem):
    """Stochastic Rosenbrock function; ``eps_high=None`` means ``ε = 1``."""

    label: str
    eps_high: float | None
    tol: float = 1e-4
    error_name: str = "distance to (1, 1)"
    param_names: tuple[str, ...] = ("xy",)
    residual_dims: int = 1

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"rosenbrock {self.label}"

    @property
    def objective_label(self) -> str:
        """What :meth:`objective` is, for plot axes."""
        return "loss" if self.eps_high is None else "expected loss (over ε)"

    def initial(self, seed: int) -> tuple[Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        u = torch.rand(2, generator=g, dtype=DTYPE)
        return (torch.stack([4.0 * u[0] - 2.0, 4.0 * u[1] - 1.0]),)

    def draw_chunk(self, generator: torch.Generator, count: int) -> Tensor:
        if self.eps_high is None:
            return torch.ones(count, dtype=DTYPE)
        return self.eps_high * torch.rand(count, generator=generator, dtype=DTYPE)

    def residuals(self, params: Sequence[Tensor], draw: Tensor) -> Tensor:
        (xy,) = params
        x, y = xy[..., 0], xy[..., 1]
        return torch.stack([1.0 - x, 10.0 * draw.sqrt() * (y - x * x)], dim=-1)

    def error(self, params: Sequence[Tensor]) -> Tensor:
        (xy,) = params
        return (xy - 1.0).pow(2).sum(-1).sqrt()

    def objective(self, params: Sequence[Tensor]) -> Tensor:
        (xy,) = params
        x, y = xy[..., 0], xy[..., 1]
        mean_eps = 1.0 if self.eps_high is None else self.eps_high / 2.0
        return (1.0 - x).pow(2) + 100.0 * mean_eps * (y - x * x).pow(2)


@dataclass
class DeepLinear(SmallProblem):
    """Two-layer linear network ``W1 W2`` fitted to a badly conditioned ``A``.

    ``A = U diag(logspace(0, -log10(condition), n)) Vᵀ`` with random orthogonal ``U``,
    ``V`` from ``problem_seed``. Each iteration draws ``batch`` samples
    ``x ~ N(0, I)``; the residuals are ``(W1 W2 x - A x) / sqrt(batch)`` so that
    ``Σ r²`` is the batch mean of ``|W1 W2 x - A x|²``. ``W1``, ``W2`` start with
    i.i.d. ``N(0, init_std²)`` entries.
    """

    n: int = 10
    condition: float = 1e5
    batch: int = 64
    objective_label: str = "expected loss (over x)"
    init_std: float = 0.01
    tol: float = 1e-3
    problem_seed: int = 0
    error_name: str = "|W1 W2 - A|²_F / |A|²_F"
    param_names: tuple[str, ...] = ("w1", "w2")
    residual_dims: int = 2
    target: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.problem_seed)
        u, _ = torch.linalg.qr(torch.randn(self.n, self.n, generator=g, dtype=DTYPE))
        v, _ = torch.linalg.qr(torch.randn(self.n, self.n, generator=g, dtype=DTYPE))
        s = torch.logspace(0.0, -math.log10(self.condition), self.n, dtype=DTYPE)
        self.target = u @ torch.diag(s) @ v.T

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"linear {self.n}x{self.n}"

    def initial(self, seed: int) -> tuple[Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        shape = (self.n, self.n)
        return tuple(self.init_std * torch.randn(shape, generator=g, dtype=DTYPE) for _ in "12")

    def draw_chunk(self, generator: torch.Generator, count: int) -> Tensor:
        return torch.randn(count, self.batch, self.n, generator=generator, dtype=DTYPE)

    def residuals(self, params: Sequence[Tensor], draw: Tensor) -> Tensor:
        w1, w2 = params
        a = self.target.to(w1.device)
        return draw @ (w1 @ w2 - a).mT / math.sqrt(self.batch)

    def error(self, params: Sequence[Tensor]) -> Tensor:
        w1, w2 = params
        a = self.target.to(w1.device)
        return (w1 @ w2 - a).pow(2).sum((-2, -1)) / a.pow(2).sum()

    def objective(self, params: Sequence[Tensor]) -> Tensor:
        w1, w2 = params
        return (w1 @ w2 - self.target.to(w1.device)).pow(2).sum((-2, -1))


class DrawStream:
    """The random draws of one seed, by iteration, identical for every optimizer.

    Draws come in chunks of ``chunk`` iterations, each from its own generator seeded
    from ``(seed, chunk index)``, so any iteration can be looked up cheaply.
    """

    def __init__(
        self, problem: SmallProblem, seed: int, device: torch.device, chunk: int = 256
    ) -> None:
        self.problem = problem
        self.seed = seed
        self.device = device
        self.chunk = chunk
        self._index = -1
        self._data: Tensor | None = None

    def __getitem__(self, t: int) -> Tensor:
        index = t // self.chunk
        if index != self._index or self._data is None:
            g = torch.Generator().manual_seed(1_000_003 * (self.seed + 1) + index)
            self._data = self.problem.draw_chunk(g, self.chunk).to(self.device)
            self._index = index
        return self._data[t % self.chunk]


class ResidualModule(nn.Module):
    """One copy of a small problem as a module whose forward returns the residuals."""

    def __init__(self, problem: SmallProblem, params: Sequence[Tensor]) -> None:
        super().__init__()
        self.problem = problem
        for name, value in zip(problem.param_names, params, strict=True):
            self.register_parameter(name, nn.Parameter(value.clone()))

    def values(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, n) for n in self.problem.param_names)

    def forward(self, draw: Tensor) -> Tensor:
        return self.problem.residuals(self.values(), draw)


def least_squares(residuals: Tensor) -> Tensor:
    """The loss of the small problems: ``Σ r²``."""
    return residuals.pow(2).sum()


@dataclass
class Trace:
    """One run: iterations to converge (``None``: not within the cap) and its curves."""

    iterations: int | None
    objective: list[float]
    seconds: list[float]
    diverged: bool = False


StepperFactory = Callable[[nn.Module], optimizers.Stepper]


def run_single(
    problem: SmallProblem,
    seed: int,
    make: StepperFactory,
    cap: int,
    device: torch.device,
) -> Trace:
    """Run one optimizer on one seed until convergence, divergence or ``cap``.

    ``seconds`` counts only the time spent inside ``step``.
    """
    module = ResidualModule(problem, problem.initial(seed)).to(device)
    stepper = make(module)
    stream = DrawStream(problem, seed, device)
    with torch.no_grad():
        objective = [float(problem.objective(module.values()))]
    seconds = [0.0]
    elapsed = 0.0
    for t in range(cap):
        draw = stream[t]
        start = time.perf_counter()
        stepper.step(lambda draw=draw: module(draw), least_squares)
        elapsed += time.perf_counter() - start
        with torch.no_grad():
            values = module.values()
            error = float(problem.error(values))
            objective.append(float(problem.objective(values)))
        seconds.append(elapsed)
        if not math.isfinite(error):
            return Trace(None, objective, seconds, diverged=True)
        if error < problem.tol:
            return Trace(t + 1, objective, seconds)
    return Trace(None, objective, seconds)


@dataclass
class GridResult:
    """A learning-rate grid search: per-lr outcome and the chosen lr's runs."""

    lrs: list[float]
    hits: list[list[int | None]]  # [lr][seed]: iterations to converge, None if not
    iterations_run: int
    best: int
    traces: list[Trace]  # chosen lr, one per seed (seconds filled in later)

    def summary(self, cap: int) -> list[dict[str, Any]]:
        """One entry per lr: converged count and the median when it is known."""
        out = []
        for lr, hits in zip(self.lrs, self.hits, strict=True):
            done = [h for h in hits if h is not None]
            entry: dict[str, Any] = {"lr": lr, "converged": len(done), "seeds": len(hits)}
            if len(done) == len(hits) or self.iterations_run >= cap:
                entry["median_iterations"] = statistics.median(
                    [cap if h is None else h for h in hits]
                )
            else:
                entry["median_iterations"] = f"> {self.iterations_run} (search stopped)"
            out.append(entry)
        return out


def _rank(hits: list[int | None], final_error: list[float], cap: int) -> tuple[float, ...]:
    values = [cap if h is None else h for h in hits]
    finite = [e if math.isfinite(e) else math.inf for e in final_error]
    return (
        statistics.median(values),
        -sum(h is not None for h in hits),
        statistics.fmean(values),
        statistics.median(finite),
    )


def run_grid(
    problem: SmallProblem,
    seeds: Sequence[int],
    lrs: Sequence[float],
    rule: str,
    cap: int,
    device: torch.device,
    check_every: int = 50,
) -> GridResult:
    """Tune a first-order baseline: every (seed, lr) pair runs as an independent copy.

    The search stops early once the best lr is known for sure: some lr has converged
    on every seed and no other lr can still reach a lower median (fewer than half of
    its seeds have converged so far). Selection: lowest median iterations (a run that
    has not converged counts as the cap), then most seeds converged, then lowest mean,
    then lowest median final error.
    """
    n_seeds, n_lrs = len(seeds), len(lrs)
    starts = [problem.initial(s) for s in seeds]
    params = []
    for i in range(len(problem.param_names)):
        stacked = torch.stack([p[i] for p in starts]).to(device)  # (S, ...)
        expanded = stacked.unsqueeze(1).expand(n_seeds, n_lrs, *stacked.shape[1:])
        params.append(expanded.clone().requires_grad_(True))
    lr_shape = (1, n_lrs) + (1,) * (params[0].dim() - 2)
    lr = torch.tensor(list(lrs), dtype=DTYPE, device=device).view(lr_shape)
    updater = optimizers.GRID_RULES[rule](params, lr)
    streams = [DrawStream(problem, s, device) for s in seeds]
    hits = torch.full((n_seeds, n_lrs), -1, dtype=torch.long, device=device)
    with torch.no_grad():
        curve = [problem.objective(params).detach()]
    t_done = cap
    half = (n_seeds + 1) // 2
    for t in range(cap):
        draw = torch.stack([s[t] for s in streams]).unsqueeze(1)
        loss = problem.loss_per_copy(problem.residuals(params, draw)).sum()
        grads = torch.autograd.grad(loss, params)
        updater.update(grads)
        with torch.no_grad():
            error = problem.error(params)
            hits = torch.where((error < problem.tol) & (hits < 0), t + 1, hits)
            curve.append(problem.objective(params))
        if (t + 1) % check_every == 0:
            done = (hits >= 0).sum(0)
            complete = done == n_seeds
            if bool(complete.any()) and bool(((done < half) | complete).all()):
                t_done = t + 1
                break
    hits_list = hits.T.tolist()
    hit_values: list[list[int | None]] = [[h if h >= 0 else None for h in row] for row in hits_list]
    final_error = problem.error(params).detach().T.tolist()
    ranks = [_rank(h, e, cap) for h, e in zip(hit_values, final_error, strict=True)]
    best = min(range(n_lrs), key=lambda j: ranks[j])
    objective = torch.stack(curve).cpu()  # (T+1, S, L)
    traces = []
    for i in range(n_seeds):
        h = hit_values[best][i]
        end = (h if h is not None else t_done) + 1
        values = objective[:end, i, best].tolist()
        diverged = not math.isfinite(final_error[best][i]) and h is None
        traces.append(Trace(h, values, [], diverged=diverged))
    return GridResult(list(lrs), hit_values, t_done, best, traces)


def seconds_per_iteration(
    problem: SmallProblem,
    make: StepperFactory,
    device: torch.device,
    iterations: int = 200,
) -> float:
    """Wall-clock seconds of one step of an unbatched run (seed 0), median of blocks."""
    module = ResidualModule(problem, problem.initial(0)).to(device)
    stepper = make(module)
    stream = DrawStream(problem, 0, device)
    blocks = []
    block = max(iterations // 5, 1)
    for b in range(5):
        start = time.perf_counter()
        for t in range(b * block, (b + 1) * block):
            draw = stream[t]
            stepper.step(lambda draw=draw: module(draw), least_squares)
        blocks.append((time.perf_counter() - start) / block)
    return statistics.median(blocks)


def single_run_optimizers() -> dict[str, StepperFactory]:
    """Optimizers run one seed at a time at fixed settings (CurveBall at defaults)."""
    return {
        "CurveBall": optimizers.curveball,
        "L-BFGS": lambda m: optimizers.LBFGSStepper(m.parameters()),
        "Levenberg-Marquardt": lambda m: optimizers.LevenbergMarquardt(m),
    }


TORCH_RULES: dict[str, Callable[[Any, float], optimizers.Stepper]] = {
    "SGD": optimizers.sgd,
    "Adam": optimizers.adam,
}


@dataclass
class SmallSettings:
    """Knobs of a small-problem experiment."""

    seeds: list[int]
    cap: int = CAP
    lrs: list[float] = field(default_factory=optimizers.lr_grid)
    timing_iterations: int = 200


def run_problems(
    report: Report,
    problems: Sequence[SmallProblem],
    settings: SmallSettings,
    device: torch.device,
) -> None:
    """Run every optimizer on every problem and add rows, curves and settings."""
    singles = single_run_optimizers()
    total = len(problems) * (len(singles) * len(settings.seeds) + len(TORCH_RULES))
    bar = progress(total, report.experiment)
    for problem in problems:
        report.settings.setdefault("problems", {})[problem.name] = {
            "tolerance": problem.tol,
            "error": problem.error_name,
        }
        for name, make in singles.items():
            # A few untimed steps first, so that one-time set-up costs (lazy imports,
            # kernel selection) do not land on the first seed's wall-clock.
            run_single(problem, settings.seeds[0], make, 3, device)
            traces = []
            for seed in settings.seeds:
                bar.set_postfix_str(f"{problem.name} {name} seed {seed}")
                traces.append(run_single(problem, seed, make, settings.cap, device))
                bar.update(1)
            report.add_runs(problem.name, name, traces, settings.cap, label=problem.objective_label)
        for rule, make_torch in TORCH_RULES.items():
            bar.set_postfix_str(f"{problem.name} {rule} lr grid")
            grid = run_grid(problem, settings.seeds, settings.lrs, rule, settings.cap, device)
            lr = grid.lrs[grid.best]
            per_step = seconds_per_iteration(
                problem,
                lambda m, make_torch=make_torch, lr=lr: make_torch(m.parameters(), lr),
                device,
                settings.timing_iterations,
            )
            for trace in grid.traces:
                trace.seconds = [i * per_step for i in range(len(trace.objective))]
            report.add_runs(
                problem.name, rule, grid.traces, settings.cap, lr=lr, label=problem.objective_label
            )
            report.settings.setdefault("lr_search", {}).setdefault(problem.name, {})[rule] = {
                "chosen_lr": lr,
                "iterations_searched": grid.iterations_run,
                "seconds_per_iteration_unbatched": per_step,
                "grid": grid.summary(settings.cap),
            }
            bar.update(1)
    bar.close()


def rosenbrock_problems() -> list[Rosenbrock]:
    """The three variants of the paper."""
    return [
        Rosenbrock("deterministic", None),
        Rosenbrock("ε~U[0,1]", 1.0),
        Rosenbrock("ε~U[0,3]", 3.0),
    ]


def _common_notes(report: Report, settings: SmallSettings) -> None:
    report.notes += [
        f"Iteration cap {settings.cap}; a run that has not converged by then counts as "
        f"{settings.cap} iterations (see the 'converged' column).",
        "Every optimizer sees the same start point and the same random draws for a given seed.",
        f"CurveBall: {optimizers.curveball_description()}, no tuning.",
        "SGD (momentum 0.9) and Adam: best lr of the grid "
        + ", ".join(f"{lr:.3g}" for lr in settings.lrs)
        + " chosen on the reported seeds themselves (this favours them); selection by median "
        "iterations, then seeds converged, then mean. The search runs all grid points and "
        "seeds as independent copies with the update rules of torch.optim.SGD/Adam and stops "
        "once no other lr can reach a lower median.",
        "Wall-clock of SGD and Adam: iterations x seconds per step measured on an unbatched "
        "torch.optim run at the chosen lr (the search itself is batched); other optimizers: "
        "measured time inside step().",
        "L-BFGS: torch.optim.LBFGS, lr 1, history 10, one iteration (strong-Wolfe line search, "
        "at most 20 evaluations) per step. Levenberg-Marquardt: dense Jacobian (torch.func."
        "jacrev), solve (JᵀJ + mu I) d = -Jᵀr, Nielsen's damping rule, rejected trials count "
        "as iterations.",
        "All computations in float64.",
    ]


def run_rosenbrock(out_dir: Any, seeds: list[int], quick: bool, device: torch.device) -> Report:
    """The Rosenbrock experiment (three variants)."""
    settings = SmallSettings(seeds=seeds)
    if quick:
        settings.cap = 200
        settings.lrs = optimizers.lr_grid(-4, 0, half_steps=False)
        settings.timing_iterations = 20
    report = Report("rosenbrock", out_dir, device=str(device))
    report.settings.update(
        {
            "seeds": seeds,
            "cap": settings.cap,
            "lr_grid": settings.lrs,
            "start": "uniform in [-2, 2] x [-1, 3], from torch.Generator().manual_seed(seed)",
            "loss": "sum of squared residuals r = [1 - x, 10 sqrt(eps) (y - x^2)]",
            "eps": "drawn afresh each iteration; same draws for every optimizer",
            "tolerance": "|(x, y) - (1, 1)| < 1e-4",
        }
    )
    report.notes += (
        "Start points uniform in [-2, 2] x [-1, 3]; (1, 1) minimises f for every eps, so the "
        "stochastic variants also converge exactly.",
        "With two residuals and two unknowns the Gauss-Newton step -J^-1 r does not depend "
        "on eps (sqrt(eps) scales one row of J and the same entry of r), so the second-order "
        "methods are nearly insensitive to the noise; only their damping breaks the invariance.",
    )
    _common_notes(report, settings)
    run_problems(report, rosenbrock_problems(), settings, device)
    for problem in rosenbrock_problems():
        cb = report.median(problem.name, "CurveBall", "iterations")
        others = [report.median(problem.name, o, "iterations") for o in ("SGD", "Adam")]
        report.check(
            f"{problem.name}: CurveBall median <= 40 iterations",
            cb is not None and cb <= 40,
            f"CurveBall median {cb}",
        )
        report.check(
            f"{problem.name}: CurveBall median <= 1/10 of tuned SGD's and Adam's",
            cb is not None and all(o is not None and cb <= o / 10 for o in others),
            f"CurveBall {cb}, SGD {others[0]}, Adam {others[1]}",
        )
    return report


def run_linear(out_dir: Any, seeds: list[int], quick: bool, device: torch.device) -> Report:
    """The degenerate two-layer linear network experiment."""
    settings = SmallSettings(seeds=seeds)
    problem = DeepLinear()
    if quick:
        settings.cap = 200
        settings.lrs = optimizers.lr_grid(-3, 0, half_steps=False)
        settings.timing_iterations = 20
    report = Report("linear", out_dir, device=str(device))
    report.settings.update(
        {
            "seeds": seeds,
            "cap": settings.cap,
            "lr_grid": settings.lrs,
            "n": problem.n,
            "condition_number": problem.condition,
            "batch": problem.batch,
            "init": f"W1, W2 entries i.i.d. N(0, {problem.init_std}^2), seeded by the run seed",
            "target": "A = U diag(logspace(0, -5, n)) V^T, U, V orthogonal from QR of "
            f"Gaussian matrices, generator seed {problem.problem_seed} (same A for all seeds)",
            "loss": "mean over the batch of |W1 W2 x - A x|^2 (residuals scaled by "
            "1/sqrt(batch), loss = sum r^2)",
            "tolerance": f"|W1 W2 - A|_F^2 / |A|_F^2 < {problem.tol}",
        }
    )
    report.notes.append(
        f"A is {problem.n}x{problem.n} with singular values logspace(0, -5, {problem.n}) "
        f"(condition number 1e5); each iteration draws {problem.batch} fresh samples "
        f"x ~ N(0, I); W1, W2 start with N(0, {problem.init_std}^2) entries; converged when "
        f"the relative squared Frobenius error is below {problem.tol}."
    )
    _common_notes(report, settings)
    run_problems(report, [problem], settings, device)
    cb = report.median(problem.name, "CurveBall", "iterations")
    others = [report.median(problem.name, o, "iterations") for o in ("SGD", "Adam")]
    report.check(
        f"{problem.name}: CurveBall median iterations below tuned SGD's and Adam's",
        cb is not None and all(o is not None and cb < o for o in others),
        f"CurveBall {cb}, SGD {others[0]}, Adam {others[1]}",
    )
    return report
