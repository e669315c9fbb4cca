"""The neural-operator race: CurveBall against Adam and its kin training neuraloperator's FNO
on the FNO paper's Burgers and Darcy problems, for the same wall-clock budget each.

The problems (Li et al., "Fourier Neural Operator for Parametric Partial Differential
Equations", ICLR 2021, arXiv:2010.08895): the 1D viscous Burgers map ``u₀ ↦ u(·, 1)``
(ν = 0.1) and the 2D Darcy map ``a ↦ u`` of ``−∇·(a∇u) = 1``; the data come from the
solvers of :mod:`benchmarks.operator_data`, generated on the first run and cached on disk
(``--cache``, ``$CURVEBALL_CACHE``, else ``~/.cache/curveball-benchmarks``). Inputs are
standardised and targets divided by their root mean square, with training-set scalars (the
relative errors do not change under that scaling). The model is ``neuralop.models.FNO`` at
the library's defaults — four Fourier layers, a grid positional embedding, complex
spectral weights — with ``n_modes=(16,)`` and 64 channels for Burgers, ``n_modes=(12, 12)``
and 32 channels for Darcy (the paper's widths). neuraloperator 2.0 counts ``n_modes`` over
the whole spectrum of each axis, so on the real-FFT axis it keeps ``n // 2 + 1`` modes
(9 of ``(16,)``; 12 × 7 of ``(12, 12)``), fewer than the paper's code kept.

Contenders, all from the same initial weights on the same batch order:

* ``curveball``: ``curveball.CurveBall(model)`` at its defaults on the squared relative
  error ``mean_i ‖y_i − t_i‖² / ‖t_i‖²`` (:func:`squared_relative_l2`, quadratic in the
  predictions, as a Gauss–Newton method wants);
* ``adam-fno``: the paper's recipe — Adam, lr 10⁻³, weight decay 10⁻⁴, on the sum over the
  batch of the relative errors ``‖y_i − t_i‖ / ‖t_i‖`` (the paper's ``LpLoss`` with
  ``size_average=False``), the learning rate halved every 100 of 500 epochs; here every fifth
  of the budget (the contender's own stepping time): ``lr = 10⁻³ · 2^−⌊5 s / budget⌋``;
* ``adam``: Adam on the mean relative error at the best learning rate of ``ADAM_GRID``
  (every grid point runs the whole budget; the table reports the grid's total time);
* ``adamw``: ``torch.optim.AdamW`` at its defaults (lr 10⁻³, weight decay 10⁻²);
* ``schedulefree-adamw``: ``schedulefree.AdamWScheduleFree`` at its defaults, switched to
  its evaluation weights (``optimizer.eval()``) for every test and back (``.train()``).

Only the optimizer steps are timed; the contenders step in lockstep (one step each per round,
the order rotating) until each has used its budget, so machine noise hits all alike. At
``--eval-points`` moments of each contender's own time the test relative L2 error is
measured (untimed). The target is the best final test error of the Adam family (``adam-fno``,
``adam``, ``adamw``); the table gives each contender's test error at the budget, the time it
needs to reach the target and that time relative to the best Adam's, its steps and its
median step time, beside the error the FNO paper reports for the same problem. A contender
that cannot be built or fails a step keeps its row, with the error; caveats about complex
parameters (:data:`COMPLEX_NOTES`) are printed under the table. Example::

    python -m benchmarks.operator_race --budget 60 --markdown out/operators.md --plots out/ops
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from benchmarks import common, operator_data, plots
from benchmarks.common import sync
from curveball import CurveBall

ADAM_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
CONTENDERS = ("curveball", "adam-fno", "adam", "adamw", "schedulefree-adamw")
ADAM_FAMILY = ("adam-fno", "adam", "adamw")
QUICK_CHANNELS = 8  # the width of the --quick models
COMPLEX_NOTES = {
    "schedulefree-adamw": (
        "schedulefree's AdamWScheduleFree (1.4.1) accumulates g·g, not |g|², for complex "
        "parameters: on the FNO's complex spectral weights its second moment can be negative "
        "and its updates are not Adam's (torch.optim.Adam and AdamW treat a complex parameter "
        "as a pair of real ones)"
    ),
}
"""Caveats printed under a table whose model has complex parameters, by contender."""


@dataclass(frozen=True)
class Problem:
    """A race problem: its FNO's modes and width, and the errors the FNO paper reports."""

    name: str
    n_modes: tuple[int, ...]
    hidden_channels: int
    paper: dict[int, float]  # resolution -> the FNO's test relative L2 error in the paper


PROBLEMS = {
    "burgers": Problem("burgers", (16,), 64, {256: 0.0149, 1024: 0.0160, 8192: 0.0139}),
    "darcy": Problem("darcy", (12, 12), 32, {85: 0.0108, 421: 0.0098}),
}
"""The paper's FNO test errors (1,000 training pairs, 500 epochs of Adam): its Burgers table
(ν = 0.1, s = 256 … 8192) and its Darcy table (s = 85 … 421)."""


# ------------------------------------------------------------------------------- losses
def relative_l2(
    predictions: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """The FNO paper's loss and metric: ``‖y_i − t_i‖₂ / ‖t_i‖₂`` per sample (all grid
    points of a sample together), averaged (``"mean"``) or summed (``"sum"``) over the batch."""
    errors = (predictions - targets).flatten(1).norm(dim=1) / targets.flatten(1).norm(dim=1)
    return errors.mean() if reduction == "mean" else errors.sum()


def squared_relative_l2(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_i ‖y_i − t_i‖² / ‖t_i‖²``: a quadratic in the predictions whose Hessian is
    ``diag(2 / (B ‖t_i‖²))`` per sample, CurveBall's loss here."""
    squares = (predictions - targets).flatten(1).pow(2).sum(1)
    return (squares / targets.flatten(1).pow(2).sum(1)).mean()


def fno_learning_rate(progress: float, lr: float = 1e-3) -> float:
    """The paper's step decay scaled to the budget: halved at every fifth of it."""
    return lr * 0.5 ** min(4, int(5 * progress))


# --------------------------------------------------------------------------------- data
@dataclass
class Data:
    """A problem's tensors ``(pairs, 1, *grid)``, scaled, on the race's device."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    spec: operator_data.DataSpec
    generation_seconds: float  # the solvers' time when the data set was generated
    cached: bool  # read from the cache in this run


def prepare(problem: str, size: str, cache: str | None, device: torch.device) -> Data:
    """The cached data set of ``problem`` at ``size``, standardised (inputs: training mean
    and standard deviation; targets: divided by their training root mean square)."""
    spec = operator_data.SIZES[size][problem]
    cached = (operator_data.cache_folder(cache) / spec.filename()).is_file()
    arrays = operator_data.load(spec, cache)
    keys = ("x_train", "y_train", "x_test", "y_test")
    tensors = {k: torch.from_numpy(arrays[k]).unsqueeze(1) for k in keys}
    mean, std = tensors["x_train"].mean(), tensors["x_train"].std()
    scale = tensors["y_train"].pow(2).mean().sqrt()
    scaled = {k: ((v - mean) / std if k.startswith("x") else v / scale) for k, v in tensors.items()}
    on_device = {k: v.to(device) for k, v in scaled.items()}
    return Data(**on_device, spec=spec, generation_seconds=float(arrays["seconds"]), cached=cached)


def batch_order(pairs: int, batch_size: int, seed: int) -> Callable[[int], torch.Tensor]:
    """Batch ``k`` of every contender: epochs of seeded permutations cut into batches of
    ``min(batch_size, pairs)``, the last partial batch of each epoch dropped. Returns
    ``k ↦ indices``, extended on demand."""
    size = min(batch_size, pairs)
    per_epoch = pairs // size

    def batch(k: int) -> torch.Tensor:
        epoch, position = divmod(k, per_epoch)
        order = torch.randperm(pairs, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        return order[position * size : (position + 1) * size]

    return batch

    return batch


# -------------------------------------------------------------------------------- model
def build_model(problem: Problem, channels: int | None = None) -> nn.Module:
    """``neuralop.models.FNO`` at its defaults with the problem's modes, one input and one
    output channel (the default grid embedding adds the coordinates as further inputs)."""
    from neuralop.models import FNO

    width = problem.hidden_channels if channels is None else channels
    return FNO(n_modes=problem.n_modes, hidden_channels=width, in_channels=1, out_channels=1)


def parameter_layout(model: nn.Module) -> dict:
    """The model's trainable parameters: tensors and scalars by dtype, and the complex ones."""
    tensors: dict[str, int] = {}
    scalars: dict[str, int] = {}
    complex_shapes = {}
    for name, p in model.named_parameters():
        dtype = str(p.dtype).removeprefix("torch.")
        tensors[dtype] = tensors.get(dtype, 0) + 1
        scalars[dtype] = scalars.get(dtype, 0) + p.numel()
        if p.is_complex():
            complex_shapes[name] = list(p.shape)
    return {"tensors": tensors, "scalars": scalars, "complex": complex_shapes}


# --------------------------------------------------------------------------- contenders
Step = Callable[[torch.Tensor, torch.Tensor, float], None]  # (inputs, targets, progress)


@dataclass
class Contender:
    """One optimizer's run: its model, its step, and what the race measured."""

    name: str
    model: nn.Module
    step: Step | None
    lr: float | None = None
    switch: Callable[[bool], None] | None = None  # to evaluation weights (True) and back
    optimizer: object | None = None
    times: list[float] = field(default_factory=list)
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # steps, s, error
    error: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # CurveBall's skipped steps

    @property
    def seconds(self) -> float:
        return sum(self.times)


def gradient_step(
    opt: torch.optim.Optimizer,
    model: nn.Module,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: Callable[[float], float] | None = None,
) -> Step:
    """``loss(model(x), t).backward()`` and ``opt.step()``; ``schedule(progress)`` sets lr."""

    def step(x: torch.Tensor, t: torch.Tensor, progress: float) -> None:
        if schedule is not None:
            for group in opt.param_groups:
                group["lr"] = schedule(progress)
        opt.zero_grad(set_to_none=True)
        loss(model(x), t).backward()
        opt.step()

    return step


def curveball_step(opt: CurveBall, model: nn.Module) -> Step:
    """``opt.step(lambda: model(x), loss_fn)`` with the squared relative error as ``loss_fn``."""

    def step(x: torch.Tensor, t: torch.Tensor, progress: float) -> None:
        opt.step(lambda: model(x), lambda y: squared_relative_l2(y, t))

    return step


def _schedulefree(model: nn.Module) -> tuple[Step, Callable[[bool], None], object]:
    import schedulefree

    opt = schedulefree.AdamWScheduleFree(model.parameters())
    opt.train()  # its documentation: train() before training, eval() before evaluating

    def switch(evaluating: bool) -> None:
        opt.eval() if evaluating else opt.train()

    return gradient_step(opt, model, relative_l2), switch, opt


def make_contender(name: str, model: nn.Module, lr: float | None = None) -> Contender:
    """The contender ``name`` on ``model`` (``lr``: the grid point, for ``adam``); a
    contender that cannot be built gets its row with the error, and no step."""
    c = Contender(name, model, None, lr)
    try:
        if name == "curveball":
            c.optimizer = CurveBall(model)
            c.step = curveball_step(c.optimizer, model)
        elif name == "adam-fno":
            c.lr, c.optimizer = 1e-3, torch.optim.Adam(model.parameters(), 1e-3, weight_decay=1e-4)
            loss = lambda y, t: relative_l2(y, t, "sum")  # noqa: E731
            c.step = gradient_step(c.optimizer, model, loss, fno_learning_rate)
        elif name == "adam":
            c.optimizer = torch.optim.Adam(model.parameters(), lr)
            c.step = gradient_step(c.optimizer, model, relative_l2)
        elif name == "adamw":
            c.lr, c.optimizer = 1e-3, torch.optim.AdamW(model.parameters())
            c.step = gradient_step(c.optimizer, model, relative_l2)
        elif name == "schedulefree-adamw":
            c.lr = 0.0025
            c.step, c.switch, c.optimizer = _schedulefree(model)
        else:
            raise ValueError(f"unknown contender {name!r}")
    except Exception as error:  # e.g. CurveBall before complex parameters are supported
        c.error = _describe(error)
    return c


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"


# ----------------------------------------------------------------------------- the race
@torch.no_grad()
def measure_test_error(c: Contender, data: Data, chunk: int = 64) -> float:
    """The mean test relative L2 error, in evaluation mode (and evaluation weights)."""
    if c.switch is not None:
        c.switch(True)
    c.model.eval()
    total = 0.0
    for start in range(0, len(data.x_test), chunk):
        y = c.model(data.x_test[start : start + chunk])
        total += float(relative_l2(y, data.y_test[start : start + chunk], "sum"))
    c.model.train()
    if c.switch is not None:
        c.switch(False)
    return total / len(data.x_test)


def timed_step(
    c: Contender, x: torch.Tensor, t: torch.Tensor, budget: float, device: torch.device
) -> None:
    """One timed step; a failure ends the contender's run with the error in its row."""
    start = time.perf_counter()
    try:
        c.step(x, t, c.seconds / budget)
        sync(device)
    except Exception as error:
        c.error = _describe(error)
        return
    c.times.append(time.perf_counter() - start)
    last = getattr(c.optimizer, "last", None)
    if c.name == "curveball" and last is not None and last.skipped:
        c.skipped[last.reason] = c.skipped.get(last.reason, 0) + 1


def record(c: Contender, data: Data) -> None:
    """Measure the test error now; a non-finite one ends the run (``diverged``)."""
    error = measure_test_error(c, data)
    c.curve.append((len(c.times), c.seconds, error))
    if not math.isfinite(error):
        c.error = f"diverged: non-finite test error after {len(c.times)} steps"


def warm_up(model: nn.Module, data: Data, batch_size: int, device: torch.device) -> None:
    """A forward and backward pass on a copy of the model, untimed, so that no contender's
    first step pays for the one-time set-up of the kernels (and their FFT plans)."""
    copy.deepcopy(model)(data.x_train[:batch_size]).square().mean().backward()
    with torch.no_grad():
        model(data.x_test[:batch_size])
    sync(device)


def race(
    contenders: list[Contender], data: Data, args: argparse.Namespace, device: torch.device
) -> None:
    """Lockstep rounds until every contender has used ``args.budget`` seconds of steps."""
    batch = batch_order(len(data.x_train), args.batch_size, args.seed)
    interval = args.budget / args.eval_points
    due = {id(c): interval for c in contenders}
    for c in contenders:
        if c.error is None:
            record(c, data)
    k = 0
    while active := [c for c in contenders if c.error is None and c.seconds < args.budget]:
        idx = batch(k)
        shift = k % len(active)
        for c in active[shift:] + active[:shift]:
            timed_step(c, data.x_train[idx], data.y_train[idx], args.budget, device)
            if c.error is None and (c.seconds >= due[id(c)] or c.seconds >= args.budget):
                record(c, data)
                due[id(c)] += interval * max(1, math.ceil((c.seconds - due[id(c)]) / interval))
        k += 1
        if args.verbose and k % 100 == 0:
            print(
                f"  round {k}: " + ", ".join(f"{c.name} {c.seconds:.0f}s" for c in active),
                flush=True,
            )


# ------------------------------------------------------------------------------ summary
def _first_reach(curve, target: float) -> tuple[int | None, float | None]:
    for steps, seconds, error in curve:
        if error <= target:
            return steps, seconds
    return None, None


def _final(c: Contender) -> float:
    return c.curve[-1][2] if c.curve else math.inf


def _row(c: Contender, target: float | None, adam_seconds: float | None) -> dict:
    row = {"contender": c.name, "lr": c.lr, "error": c.error}
    row.update(steps=len(c.times), seconds=c.seconds, curve=c.curve)
    if not c.curve:
        return row
    steps, seconds = _first_reach(c.curve, target) if target is not None else (None, None)
    row.update(
        final_test_error=_final(c),
        steps_to_target=steps,
        seconds_to_target=seconds,
        time_ratio_to_adam=None if seconds is None or not adam_seconds else seconds / adam_seconds,
        step_ms=statistics.median(c.times) * 1e3 if c.times else None,
        skipped_steps=c.skipped if c.name == "curveball" else None,
    )
    return row


def paper_reference(problem: Problem, resolution: int) -> dict:
    """The paper's FNO error at the reported resolution nearest to ours."""
    nearest = min(problem.paper, key=lambda s: abs(math.log(s / resolution)))
    return {"resolution": nearest, "test_error": problem.paper[nearest]}


def summarise(problem: Problem, data: Data, contenders: list[Contender], layout: dict) -> dict:
    """The table's rows (``adam``: the grid's best), the target and the grid's outcome."""
    grid = [c for c in contenders if c.name == "adam"]
    best_grid = min(grid, key=_final) if grid else None
    shown = [c for c in contenders if c.name != "adam" or c is best_grid]
    adams = [c for c in shown if c.name in ADAM_FAMILY and math.isfinite(_final(c))]
    best_adam = min(adams, key=_final) if adams else None
    target = _final(best_adam) if best_adam else None
    adam_seconds = _first_reach(best_adam.curve, target)[1] if best_adam else None
    return {
        "problem": problem.name,
        "data": {
            **data.spec.__dict__,
            "generation_seconds": data.generation_seconds,
            "cached": data.cached,
        },
        "model": {"n_modes": list(problem.n_modes), "parameters": layout},
        "paper": paper_reference(problem, data.spec.resolution),
        "target": target,
        "best_adam": best_adam.name if best_adam else None,
        "adam_seconds": adam_seconds,
        "adam_grid": {
            "final_test_error": {str(c.lr): _final(c) for c in grid},
            "chosen": best_grid.lr if best_grid else None,
            "total_seconds": sum(c.seconds for c in grid),
            "runs": [_row(c, target, adam_seconds) for c in grid],
        },
        "rows": [_row(c, target, adam_seconds) for c in shown],
        "notes": [
            f"{c.name}: {COMPLEX_NOTES[c.name]}"
            for c in shown
            if c.name in COMPLEX_NOTES and layout["complex"]
        ],
    }


# ---------------------------------------------------------------------------- reporting
def _fmt(value, spec: str) -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, spec)


def markdown(results: list[dict], budget: float) -> str:
    """A table per problem, with the target, the paper's error and the Adam grid below it."""
    parts = []
    for r in results:
        d, p = r["data"], r["paper"]
        lines = [
            f"### {r['problem']}: {d['train']} training / {d['test']} test pairs at "
            f"s = {d['resolution']} (solved at {d['fine']}), {budget:g} s per contender",
            "",
            "| contender | lr | test rel. L2 at the budget | time to target (s) "
            "| × best Adam (time) | steps | ms per step |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in r["rows"]:
            if "final_test_error" not in row:
                lines.append(f"| {row['contender']} | | {row['error']} | | | | |")
                continue
            final = _fmt(row["final_test_error"], ".4f") + (
                f" ({row['error']})" * bool(row["error"])
            )
            lines.append(
                f"| {row['contender']} | {_fmt(row['lr'], 'g')} | {final} "
                f"| {_fmt(row['seconds_to_target'], '.1f')} "
                f"| {_fmt(row['time_ratio_to_adam'], '.2f')} | {row['steps']} "
                f"| {_fmt(row['step_ms'], '.1f')} |"
            )
        grid = r["adam_grid"]
        tried = ", ".join(f"{lr}: {_fmt(e, '.4f')}" for lr, e in grid["final_test_error"].items())
        lines += [
            "",
            f"Target: {_fmt(r['target'], '.4f')}, the best Adam's final test error "
            f"({r['best_adam']}). The FNO paper (Li et al., ICLR 2021): {p['test_error']} at "
            f"s = {p['resolution']} (1,000 training pairs, 500 epochs).",
            f"Adam grid (lr: final test rel. L2): {tried}; the grid's total stepping time "
            f"{grid['total_seconds']:.0f} s.",
        ]
        lines += [f"Note — {note}." for note in r["notes"]]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(results: list[dict], folder: str) -> None:
    """Test relative L2 error (log) against stepping time, a line per contender."""
    plt = plots.pyplot()
    for r in results:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row in r["rows"]:
            if row["curve"]:
                _, seconds, errors = zip(*row["curve"], strict=True)
                width = 2.0 if row["contender"] == "curveball" else 1.2
                ax.plot(seconds, errors, lw=width, marker=".", label=row["contender"])
        if r["target"] is not None:
            ax.axhline(r["target"], color="k", ls=":", lw=0.8, label="target (best Adam)")
        paper = f"FNO paper, s = {r['paper']['resolution']}"
        ax.axhline(r["paper"]["test_error"], color="grey", ls="--", lw=0.8, label=paper)
        plots.log_axes(ax, "stepping time (s)", "test relative L2 error")
        ax.legend(fontsize=8)
        ax.set_title(f"FNO on {r['problem']} (s = {r['data']['resolution']})")
        plots.save(fig, folder, r["problem"], dpi=90)


# ---------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of optimizer steps per contender (default 60; 0.3 with --quick)",
    )
    p.add_argument("--batch-size", type=int, default=20, help="pairs per step (the paper: 20)")
    p.add_argument(
        "--eval-points",
        type=int,
        default=None,
        help="test evaluations per contender (default 20; 2 with --quick)",
    )
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="tiny data and models (tests)")
    sizes.add_argument("--full", action="store_true", help="the paper's data sizes (a GPU)")
    p.add_argument("--cache", default=None, help="the data cache folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: PyTorch's; 1 with --quick)",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--plots", default=None, help="a folder for one plot per problem")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 0.3 if args.quick else 60.0
    if args.threads is None and args.quick:
        args.threads = 1  # tiny models; extra threads only contend on a shared machine
    if args.eval_points is None:
        args.eval_points = 2 if args.quick else 20
    if args.budget <= 0 or args.batch_size < 1 or args.eval_points < 1:
        p.error("--budget, --batch-size and --eval-points must be positive")
    args.size = "quick" if args.quick else "full" if args.full else "default"
    return args


def race_problem(problem: Problem, args: argparse.Namespace, device: torch.device) -> dict:
    """Data, initial weights, contenders, the race and its summary for one problem."""
    data = prepare(problem.name, args.size, args.cache, device)
    torch.manual_seed(args.seed)
    init = build_model(problem, QUICK_CHANNELS if args.quick else None).to(device)
    contenders = []
    for name in args.contenders:
        for lr in ADAM_GRID if name == "adam" else (None,):
            contenders.append(make_contender(name, copy.deepcopy(init), lr))
    warm_up(init, data, args.batch_size, device)
    race(contenders, data, args, device)
    return summarise(problem, data, contenders, parameter_layout(init))


def race_all(args: argparse.Namespace) -> list[dict]:
    """Every problem of ``args``, each table printed as soon as it is done; torch's thread
    count is set to ``args.threads`` for the race and restored afterwards."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in args.problems:
                results.append(race_problem(PROBLEMS[name], args, torch.device(args.device)))
                print(markdown(results[-1:], args.budget) + "\n", flush=True)
    finally:
        torch.set_num_threads(threads)
    return results


def run(argv: list[str] | None = None) -> list[dict]:
    """The command line: race, then write ``--markdown``, ``--json`` and ``--plots``."""
    args = parse_args(argv)
    results = race_all(args)
    common.write_markdown(args.markdown, markdown(results, args.budget))
    common.write_json(args.json, {"settings": vars(args), "results": results})
    if args.plots:
        plot(results, args.plots)
    return results


if __name__ == "__main__":
    run()
