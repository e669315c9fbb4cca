"""Which model families CurveBall trains, on which path, and how exactly.

For every family of :mod:`benchmarks.zoo` (float64, a few thousand parameters)
this runs CurveBall with the parameters frozen (``lr=0``) and λ = 1 fixed for
``--steps`` steps and compares ``z`` with the damped Newton step
``−(G + λI)⁻¹ g`` from dense ``torch.func`` matrices (:mod:`benchmarks.oracles`);
it reports the engine the steps used (forward mode, the double-backward
fallback, or unsupported with the error) and, in a separate float32 run at the
defaults, the loss after 20 training steps relative to the first.

Example::

    python -m benchmarks.conformance --markdown
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

from benchmarks import common
from benchmarks.oracles import dense_problem
from benchmarks.zoo import ZOO, Family, available, cross_entropy
from curveball import CurveBall


def newton_error(family: Family, steps: int, lambd: float = 1.0) -> tuple[str, float, int]:
    """The engine, ``‖z − z*‖ / ‖z*‖`` after ``steps`` frozen steps, and the parameter count.

    The products are what is checked, so z follows the paper's iteration (no
    preconditioner), whose rate of convergence the step count was chosen for.
    """
    model, inputs, targets = family.make()
    loss_fn = cross_entropy(targets)
    opt = CurveBall(model, lr=0.0, lambd=lambd, auto_lambda=False, precondition=False)
    for _ in range(steps):
        opt.step(family.model_fn(model, inputs), loss_fn)
    dense = dense_problem(family.traceable(model), inputs, loss_fn, family.predict)
    n = dense["w"].numel()
    newton = -torch.linalg.solve(dense["G"] + lambd * torch.eye(n, dtype=torch.float64), dense["g"])
    z = torch.cat([opt.state[p]["z"].reshape(-1) for p in model.parameters()])
    return opt.last.engine, float((z - newton).norm() / newton.norm()), n


def training_ratio(family: Family, steps: int = 20) -> float:
    """Loss after ``steps`` default CurveBall steps (float32) over the first loss."""
    model, inputs, targets = family.make(seed=1, dtype=torch.float32)
    opt = CurveBall(model)
    losses = [opt.step(family.model_fn(model, inputs), cross_entropy(targets))[0].item()]
    for _ in range(steps - 1):
        losses.append(opt.step(family.model_fn(model, inputs), cross_entropy(targets))[0].item())
    return losses[-1] / losses[0]


def run(steps: int) -> list[dict]:
    rows = []
    for family in ZOO.values():
        row = {"family": family.name}
        if not available(family):
            rows.append({**row, "engine": f"not run ({family.needs} not installed)"})
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                engine, error, n = newton_error(family, steps)
                ratio = training_ratio(family)
            except Exception as error:  # reported, not hidden: that is the point of the table
                rows.append({**row, "engine": f"unsupported ({type(error).__name__}: {error})"})
                continue
        rows.append({**row, "params": n, "engine": engine, "newton_error": error,
                     "loss_ratio_20": ratio})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], steps: int) -> str:
    lines = [
        f"| model family | parameters | engine | ‖z − z*‖ / ‖z*‖ after {steps} steps "
        "| loss after 20 steps / first |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        if "newton_error" not in r:
            lines.append(f"| {r['family']} | | {r['engine']} | | |")
            continue
        lines.append(
            f"| {r['family']} | {r['params']:,} | {r['engine']} | {r['newton_error']:.1e} "
            f"| {r['loss_ratio_20']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="frozen steps before comparing z")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    parser.add_argument(
        "--markdown", nargs="?", const="", default=None, metavar="PATH",
        help="print a markdown table (and write it to PATH, if given)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = run(args.steps)
    common.write_json(args.json, rows)
    if args.markdown is not None:
        print(markdown(rows, args.steps))
        common.write_markdown(args.markdown or None, markdown(rows, args.steps))
    return rows


if __name__ == "__main__":
    main()
