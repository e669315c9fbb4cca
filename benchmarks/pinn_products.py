"""What the products of a physics-informed network cost, engine by engine.

On one PINN task of :mod:`benchmarks.pdes` (the residual written the user's way, with
``torch.autograd.grad``), this times, interleaved and as medians:

* a plain evaluation of the residual (``model_fn``);
* CurveBall's first pass (``y`` and ``J z`` with the graph for the backward pass), one
  Jacobian-vector product ``J v`` and one vector-Jacobian product ``Jᵀ u``, for the forward-mode
  engine (forward-over-reverse) and the double-backward engine;
* the dense Jacobian ``J`` (``D`` columns by forward-mode products, as
  :mod:`curveball._gauss_newton` forms it) with each engine;
* ENGD's per-sample Jacobian (``vmap`` over the points of the gradient of the per-point
  residual, :mod:`benchmarks.pdes.residual`), which needs the residual written point by
  point with ``torch.func``.

Example::

    python -m benchmarks.pinn_products --task poisson2d --threads 1 --markdown out/products.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from argparse import Namespace
from collections.abc import Callable

import torch

from benchmarks.pdes import TASKS, FunctionalResidual
from benchmarks.pinn_race import Problem
from curveball._curvature.engine_choice import EngineChoice
from curveball._curvature.module_tensors import ModuleTensors
from curveball._gauss_newton import jacobian

ENGINES = ("forward", "double-backward")


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _engine_costs(problem: Problem, engine: str, repeats: int) -> dict[str, float]:
    """The first pass, ``J v``, ``Jᵀ u`` and the dense ``J`` with one engine, in ms."""
    model = problem.init
    points = problem.batch(0)
    params = list(model.parameters())
    choice = EngineChoice(params, ModuleTensors(model, params), engine)
    tangents = [torch.randn_like(p) for p in params]
    model_fn = lambda: problem.residual(model, points)  # noqa: E731

    def first() -> None:
        choice.run(lambda e: e.linearize(model_fn, tangents), lambda: None)
        choice.engine.finish()

    out = {"first pass": _median_ms(first, repeats)}

    def products(e) -> dict[str, float]:
        y, _ = e.linearize(model_fn, tangents)
        u = torch.ones_like(y)
        return {
            "J v": _median_ms(lambda: e.jvp(tangents), repeats),
            "Jᵀ u": _median_ms(lambda: e.vjp(u, keep_graph=True), repeats),
            "dense J": _median_ms(lambda: jacobian(e, params, y), max(1, repeats // 10)),
        }

    try:
        out.update(choice.run(products, lambda: None))
    finally:
        choice.engine.finish()
    return out


def measure(task: str, repeats: int, seed: int) -> dict:
    args = Namespace(device="cpu", seed=seed, eval_points=16)
    problem = Problem.create(TASKS[task], args)
    model, points = problem.init, problem.batch(0)
    functional = FunctionalResidual(problem.task.pde, model, points)
    params = functional.parameters()
    rows = {"model_fn": _median_ms(lambda: problem.residual(model, points), repeats)}
    for engine in ENGINES:
        for name, ms in _engine_costs(problem, engine, repeats).items():
            rows[f"{name} ({engine})"] = ms
    rows["per-sample J (torch.func, ENGD)"] = _median_ms(
        lambda: functional.jacobian(params), max(1, repeats // 2)
    )
    size = sum(p.numel() for p in model.parameters())
    count = sum(len(x) for x in points.values())
    return {"task": task, "parameters": size, "residuals": count, "ms": rows}


def markdown(result: dict) -> str:
    base = result["ms"]["model_fn"]
    lines = [
        f"{result['task']}: D = {result['parameters']:,} parameters, "
        f"N = {result['residuals']:,} residuals; medians on this machine.",
        "",
        "| product | ms | × model_fn |",
        "| --- | ---: | ---: |",
    ]
    for name, ms in result["ms"].items():
        lines.append(f"| {name} | {ms:.2f} | {ms / base:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="poisson2d", choices=list(TASKS))
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", default=None, help="write the table to this file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = measure(args.task, args.repeats, args.seed)
    text = markdown(result)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
