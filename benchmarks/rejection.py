"""What ``reject_uphill`` does: runs on which, without it, the loss runs away.

Without rejection (the paper's method) a trust-region test (every
``lambda_interval`` steps) only moves λ, by the factor ``1/ω`` (× 3/2 with the
default damping rule, 0.5 % with the paper's), however far the loss rose. With
``reject_uphill=True`` (the default) a test that finds the loss on the step's own
batch higher than before the step undoes the step, restarts ``z`` from zero and
doubles λ. This benchmark trains each problem twice from the same initial
weights and batches, with ``reject_uphill`` on and off, everything else at the
defaults, and prints the loss curve (the loss over the whole training data every
``--eval-every`` steps), the highest loss on the way and the rejected steps:

* ``mlp-512-k5``: the race's 784-512-512-10 MLP on MNIST with
  ``step_size_interval=5`` (ρ and β reused for up to four steps);
* ``concave``: a small MLP regressing on targets far from its outputs under the
  Cauchy loss ``log(1 + r²)``, which is concave there (CurveBall then uses the
  positive part of its Hessian), with λ = 0.001 and a test at every step;
* ``mnist-mlp``: the race's paper MLP at the defaults, where no test finds the
  loss risen (the two settings coincide).

Example::

    python -m benchmarks.rejection --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks import common, race
from curveball import CurveBall

RACE_PROBLEMS = {
    "mlp-512-k5": ("mnist-mlp-512", {"step_size_interval": 5}),
    "mnist-mlp": ("mnist-mlp", {}),
}
"""Problems on the race's tasks: the task and CurveBall's options."""


@dataclass
class Problem:
    name: str
    model: nn.Module
    options: dict
    steps: int
    step: Callable[[CurveBall, nn.Module, int], None]  # one step on batch number i
    loss: Callable[[nn.Module], float]  # the loss over the whole training data
    every: int  # steps between two evaluations of ``loss``


def race_problem(
    name: str, task: str, options: dict, data_dir: str, steps: int, every: int
) -> Problem:
    spec = race.TASKS[task]
    x, t = race.load_data(spec, data_dir, 0)
    order = race.batches(len(x), spec.batch_size, steps, seed=0)
    torch.manual_seed(0)

    def step(opt: CurveBall, model: nn.Module, i: int) -> None:
        race.curveball_step(opt, model)(x[order[i]], t[order[i]])

    loss = lambda m: race.training_loss(m, x, t)  # noqa: E731
    return Problem(name, spec.build(), options, steps, step, loss, every)


def concave_problem(steps: int) -> Problem:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def loss_fn(y: torch.Tensor) -> torch.Tensor:
        return torch.log1p((y - 10.0) ** 2).sum(dim=1).mean()

    def step(opt: CurveBall, model: nn.Module, i: int) -> None:
        opt.step(lambda: model(x), loss_fn)

    def loss(model: nn.Module) -> float:
        with torch.no_grad():
            return float(loss_fn(model(x)))

    options = {"lambd": 1e-3, "lambda_interval": 1, "precondition": False}
    return Problem("concave", model, options, steps, step, loss, max(1, steps // 10))


def train(problem: Problem, reject: bool) -> dict:
    model = copy.deepcopy(problem.model)
    opt = CurveBall(model, **problem.options, reject_uphill=reject)
    curve = [problem.loss(model)]
    rejected = 0
    for i in range(problem.steps):
        problem.step(opt, model, i)
        rejected += bool(opt.last.skipped and opt.last.reason.startswith("rejected"))
        if (i + 1) % problem.every == 0:
            curve.append(problem.loss(model))
    finite = [v for v in curve if math.isfinite(v)]
    return {
        "problem": problem.name,
        "reject_uphill": reject,
        "every": problem.every,
        "curve": curve,
        "highest": max(finite) if len(finite) == len(curve) else math.inf,
        "final": curve[-1],
        "rejected": rejected,
    }


def _number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "non-finite"


def markdown(rows: list[dict]) -> str:
    head = "| problem | reject_uphill | loss every k steps (k) | highest | final | rejected |"
    lines = [head, "| --- | --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        curve = " ".join(f"{v:.3g}" for v in r["curve"])
        lines.append(
            f"| {r['problem']} | {r['reject_uphill']} | {curve} ({r['every']}) "
            f"| {_number(r['highest'])} | {_number(r['final'])} | {r['rejected']} |"
        )
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("CURVEBALL_DATA", "../shared/data"))
    p.add_argument("--steps", type=int, default=200, help="steps on the race's tasks")
    p.add_argument("--concave-steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=20)
    problems = ("mlp-512-k5", "concave", "mnist-mlp")
    p.add_argument("--problems", nargs="+", default=list(problems), choices=problems)
    p.add_argument("--markdown", default=None, help="write the table to this file")
    args = p.parse_args(argv)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.problems:
            if name == "concave":
                problem = concave_problem(args.concave_steps)
            else:
                task, options = RACE_PROBLEMS[name]
                problem = race_problem(
                    name, task, options, args.data_dir, args.steps, args.eval_every
                )
            for reject in (False, True):
                rows.append(train(problem, reject))
    print(markdown(rows))
    common.write_markdown(args.markdown, markdown(rows))
    return rows


if __name__ == "__main__":
    run()
