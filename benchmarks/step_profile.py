"""Where a CurveBall step's time goes, stage by stage, on the race's tasks.

``CurveBall.step`` labels its stages for ``torch.profiler``
(:data:`curveball._products.PHASES`): the first forward-mode pass, the loss
derivatives, the backward pass, the second forward-mode pass, the host read and
2×2 solve, the update, the trust-region test's forward pass, the preconditioner and
(with ``inner_steps`` > 1, none at the defaults) the further inner iterations. This benchmark
profiles ``--steps`` steps of CurveBall at its defaults on each task (after
warm-up, with the closed-form cross-entropy) and prints, per task, the share of
the step's CPU time spent in each stage, the rest (Python, the optimizer's
bookkeeping) and the three most expensive operators of the step. The profiler
slows small operations down, so the millisecond column is above the race's.
``--loss autograd`` passes the loss as a plain function of the predictions
instead (its derivatives then come from autograd), to measure what the closed
form saves.

Example::

    python -m benchmarks.step_profile --tasks mnist-mlp char-lstm --steps 10
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import common, race
from curveball import CurveBall
from curveball._products import PHASES

STEP_KEY = "Optimizer.step#CurveBall.step"
SHORT = ("pass 1", "loss", "backward", "pass 2", "scalars", "update", "test", "precond.", "inner")


def profile_task(
    task: race.Task, x: torch.Tensor, t: torch.Tensor, steps: int, warmup: int, loss: str
) -> dict:
    """Per-stage CPU milliseconds per step, and the top operators, for one task."""
    torch.manual_seed(0)
    model = task.build()
    optimizer = CurveBall(model)
    step = race.curveball_step(optimizer, model, closed_form=loss == "closed")
    order = race.batches(len(x), task.batch_size, warmup + steps, seed=0)
    for idx in order[:warmup]:
        step(x[idx], t[idx])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for idx in order[warmup:]:
            step(x[idx], t[idx])
    events = {e.key: e for e in prof.key_averages()}
    total, stages = stage_times(events, dict(zip(SHORT, PHASES, strict=True)), steps)
    operators = sorted(
        (e for e in events.values() if e.key.startswith("aten::")),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )[:3]
    top = [(e.key[6:], e.self_cpu_time_total / 1e3 / steps / total) for e in operators]
    return {
        "task": task.name,
        "loss": loss,
        "step_ms": total,
        "stages_ms": stages,
        "top_operators": top,
    }


def stage_times(events: dict, labels: dict[str, str], steps: int) -> tuple[float, dict]:
    """CPU milliseconds per step of the whole step and of each labelled stage (``labels``:
    column to profiler label; 0 for a stage that did not run), from the profiler's
    ``key_averages()`` by key."""
    total = events[STEP_KEY].cpu_time_total / 1e3 / steps
    stages = {
        short: (events[label].cpu_time_total / 1e3 / steps if label in events else 0.0)
        for short, label in labels.items()
    }
    return total, stages


def markdown(rows: list[dict]) -> str:
    head = "| task | loss | step ms | " + " | ".join(SHORT) + " | rest | top operators (share) |"
    lines = [head, "| --- | --- | ---: |" + " ---: |" * (len(SHORT) + 1) + " --- |"]
    for r in rows:
        shares = [v / r["step_ms"] for v in r["stages_ms"].values()]
        rest = max(0.0, 1.0 - sum(shares))
        top = ", ".join(f"{name} {share:.0%}" for name, share in r["top_operators"])
        cells = " | ".join(f"{s:.0%}" for s in [*shares, rest])
        lines.append(f"| {r['task']} | {r['loss']} | {r['step_ms']:.1f} | {cells} | {top} |")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(race.TASKS), choices=list(race.TASKS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--data-dir", default=os.environ.get("CURVEBALL_DATA", "../shared/data"))
    p.add_argument("--text-chars", type=int, default=150_000)
    p.add_argument("--loss", nargs="+", default=["closed"], choices=["closed", "autograd"])
    p.add_argument("--markdown", default=None, help="write the table to this file")
    args = p.parse_args(argv)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.tasks:
            task = race.TASKS[name]
            x, t = race.load_data(task, args.data_dir, args.text_chars)
            for loss in args.loss:
                rows.append(profile_task(task, x, t, args.steps, args.warmup, loss))
    print(markdown(rows))
    common.write_markdown(args.markdown, markdown(rows))
    return rows


if __name__ == "__main__":
    run()
