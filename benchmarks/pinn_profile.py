"""Where a full-batch CurveBall step's time goes on the PINN race's tasks, against an ENGD step.

``CurveBall.step`` labels its stages for ``torch.profiler`` (:data:`curveball._products.PHASES`).
This benchmark profiles ``--steps`` steps of the PINN race's ``curveball-pointwise`` contender
(``FULL_BATCH_DEFAULTS`` on the residual written point by point, whose Jacobian ``J`` is
formed in the first pass) after ``--warmup`` steps, and prints per task the milliseconds per
step of each stage:

* ``pass 1``: the residual and ``J`` (one batched reverse-mode pass per point), and ``J z``;
* ``backward``: ``Jᵀ u``; ``pass 2``: ``J d``;
* ``precond.``: forming the preconditioner on its schedule (the dense Gauss-Newton matrix or
  its Nyström sketch) and applying it;
* ``inner``: the inner iterations after the first (products with ``J`` and ``Jᵀ``, the
  preconditioner, the 2×2 solves), and ``inner its`` how many one step takes on average;
* ``test``: the trust-region test and the line search (evaluations of the residual);
* ``rest``: the loss derivatives, the first iteration's solve (on nets of at most 2,048
  parameters the exact solve of the Gauss-Newton system, ``solver="exact"``), the update and
  the optimizer's bookkeeping.

Beside it, the same number of timed steps of ENGD in the race's form for that task (the
dense Gramian where the race runs it, else the Woodbury kernel), on the same points: the
cost of an inner iteration against an ENGD step. The profiler slows small operations down,
so the milliseconds are a little above the race's.

Example::

    python -m benchmarks.pinn_profile --tasks poisson5d-deep --steps 5 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import common, pinn_race
from benchmarks.pdes import TASKS, Task
from benchmarks.step_profile import stage_times
from curveball._products import PHASES

STAGES = {
    "pass 1": PHASES[0],
    "backward": PHASES[2],
    "pass 2": PHASES[3],
    "precond.": PHASES[7],
    "inner": PHASES[8],
    "test": PHASES[6],
}
"""The columns and the labels they read; the labels nest only inside ``inner``."""


def profile_task(task: Task, args: argparse.Namespace, steps: int, warmup: int) -> dict:
    """Per-stage milliseconds of CurveBall's steps and ENGD's step time on one task
    (``args``: the PINN race's arguments, which its contenders read)."""
    problem = pinn_race.Problem.create(task, args)
    model = copy.deepcopy(problem.init)
    step = pinn_race.make_stepper("curveball-pointwise", model, problem, args, None)
    for k in range(warmup):
        step(problem.batch(k))
    inner = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for k in range(warmup, warmup + steps):
            step(problem.batch(k))
            inner.append(step.optimizer.last.inner_steps)  # type: ignore[attr-defined]
    total, stages = stage_times({e.key: e for e in prof.key_averages()}, STAGES, steps)
    engd_model = copy.deepcopy(problem.init)
    try:  # the race's rule: the dense Gramian up to --engd-max-gramian parameters
        engd, engd_step = "engd", pinn_race.make_stepper("engd", engd_model, problem, args, None)
    except pinn_race.Skipped:
        engd = "engd-woodbury"
        engd_step = pinn_race.make_stepper(engd, engd_model, problem, args, None)
    engd_step(problem.batch(0))  # untimed, as the race's warm-up
    seconds = []
    for k in range(warmup, warmup + steps):
        start = time.perf_counter()
        engd_step(problem.batch(k))
        seconds.append(time.perf_counter() - start)
    return {
        "task": task.name,
        "parameters": common.count_parameters(problem.init),
        "step_ms": total,
        "stages_ms": stages,
        "inner_steps": statistics.mean(inner),
        "engd": engd,
        "engd_step_ms": statistics.median(seconds) * 1e3,
    }


def markdown(rows: list[dict]) -> str:
    head = (
        "| task | D | step ms | " + " | ".join(STAGES) + " | rest | inner its | "
        "ms per inner it | ENGD | ENGD step ms |"
    )
    lines = [head, "| --- | ---: | ---: |" + " ---: |" * (len(STAGES) + 4) + " --- | ---: |"]
    for r in rows:
        stages = r["stages_ms"]
        rest = max(0.0, r["step_ms"] - sum(stages.values()))
        iterations = r["inner_steps"]
        per = stages["inner"] / (iterations - 1) if iterations > 1 else None
        cells = " | ".join(f"{v:.1f}" for v in [*stages.values(), rest])
        per_cell = "—" if per is None else f"{per:.1f}"
        lines.append(
            f"| {r['task']} | {r['parameters']:,} | {r['step_ms']:.1f} | {cells} | "
            f"{iterations:.1f} | {per_cell} | {r['engd']} | {r['engd_step_ms']:.1f} |"
        )
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a tenth of the points (the tests)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--markdown", default=None, help="write the table to this file")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps: expected at least 1, got {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    # what the race's steppers read from its arguments, at the race's defaults
    race_args = pinn_race.parse_args(["--quick"] if args.quick else [])
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.tasks:
            task = TASKS[name].shrunk(0.1) if args.quick else TASKS[name]
            rows.append(profile_task(task, race_args, args.steps, args.warmup))
            print(markdown(rows[-1:]), flush=True)
    common.write_markdown(args.markdown, markdown(rows))
    return rows


if __name__ == "__main__":
    run()
