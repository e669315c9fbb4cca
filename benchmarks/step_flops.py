"""The arithmetic of a step: CurveBall's matrix-product FLOPs against Adam's, on the race's tasks.

A step's floating-point work is a floor under its time. ``torch.utils.flop_counter``
counts the FLOPs of the matrix-like operators (matrix products, convolutions,
attention, forward and backward; element-wise work is not counted), here with
formulas added for two CPU kernels it does not know: oneDNN's fused recurrent layer
(``mkldnn_rnn_layer`` and its backward) and the CPU flash attention. Adam's step
is one forward and one backward pass (SGD's the same; their own updates are
element-wise). CurveBall's is a forward pass carrying the tangent ``J z``, a backward
pass, a second forward-mode pass ``J d`` and, every ``lambda_interval`` steps, one more
forward pass for the trust-region test; the counts below are the mean over such a
cycle (steps 6 to 10), so they include it.

If a contender's step takes ``r`` times Adam's FLOPs, and time follows FLOPs, it
reaches a loss in less wall-clock time than Adam only when it needs fewer than
``1/r`` of Adam's steps: the "break-even steps" column. With ``--race PATH`` (the
race's ``--json`` output) the table sets beside it what the race measured: the step
time and the steps to the target, both relative to the best tuned Adam.

The inputs are random tensors shaped like each task's batch (FLOPs depend on
shapes only), so no data is needed. A contender's count can depend on its steps'
outcomes where it skips work: ``curveball-lazy`` skips the second forward-mode pass
only while the last ρ and β may be reused (0 ≤ ρ ≤ 1), which the repeated random
batch here need not give (on the LSTM ρ > 1 at every step, so it solves every step).

Example::

    python -m benchmarks.step_flops --race out/race.json
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import common, race

CYCLE = range(6, 11)
"""The steps counted: one whole trust-region cycle (test on step 10) after warm-up."""


def _rnn_layer_flops(input_shape, weight_ih_shape, weight_hh_shape, *args, **kwargs) -> int:
    """oneDNN's fused recurrent layer: the gate pre-activations ``W_ih x_t + W_hh h_{t-1}``
    for every sample and time step (``G`` gate rows: 4H for an LSTM, 3H for a GRU)."""
    gates, inputs = weight_ih_shape
    rows = math.prod(input_shape) // inputs  # samples × time steps
    return 2 * rows * gates * (inputs + weight_hh_shape[1])


def _rnn_layer_backward_flops(input_shape, weight_ih_shape, weight_hh_shape, *args, **kwargs):
    """Its backward pass: the products with the inputs, the hidden states and the weights,
    twice the forward's."""
    return 2 * _rnn_layer_flops(input_shape, weight_ih_shape, weight_hh_shape)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_shape, query_shape, key_shape, value_shape, *a, **k):
    return flop_counter.sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


aten = torch.ops.aten
CPU_KERNELS = {
    aten.mkldnn_rnn_layer: _rnn_layer_flops,
    aten.mkldnn_rnn_layer_backward: _rnn_layer_backward_flops,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}
"""FLOP formulas for CPU operators that ``torch.utils.flop_counter`` does not count."""


def synthetic_batch(task: race.Task, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and targets shaped like one of the task's batches."""
    g = torch.Generator().manual_seed(seed)
    n = task.batch_size
    if task.data == "mnist":
        return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    shape = (n, race.SEQ)
    return (
        torch.randint(0, race.VOCAB, shape, generator=g),
        torch.randint(0, race.VOCAB, shape, generator=g),
    )


def mean_step_flops(
    step: Callable[[torch.Tensor, torch.Tensor], None],
    x: torch.Tensor,
    t: torch.Tensor,
    steps: Sequence[int] = CYCLE,
) -> float:
    """The mean FLOPs of the given steps (numbered from 1) of ``step`` on one batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(1, steps[0]):
            step(x, t)
        with FlopCounterMode(display=False, custom_mapping=CPU_KERNELS) as counter:
            for _ in steps:
                step(x, t)
    return counter.get_total_flops() / len(steps)


def count_task(task: race.Task, contenders: Sequence[str]) -> dict[str, Any]:
    """Adam's FLOPs per step and every contender's as a multiple of them."""
    x, t = synthetic_batch(task)
    flops = {}
    for name in ("adam", *contenders):
        torch.manual_seed(0)
        model = task.build()
        flops[name] = mean_step_flops(race.make_step(name, model, 1e-3), x, t)
    return {
        "task": task.name,
        "adam_flops": flops["adam"],
        "ratio": {name: flops[name] / flops["adam"] for name in contenders},
    }


def measured(race_json: dict, task: str, contender: str) -> tuple[float | None, float | None]:
    """The race's step time and steps to the target, relative to the best tuned Adam."""
    for result in race_json["results"]:
        if result["task"] != task:
            continue
        rows = {row["contender"]: row for row in result["rows"]}
        row, adam = rows.get(contender), rows.get(result["best_adam"])
        if row is None or adam is None:
            return None, None
        return row["step_ms"] / adam["step_ms"], row["step_ratio_to_adam"]
    return None, None


def _cell(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(rows: list[dict], race_json: dict | None = None) -> str:
    contenders = list(rows[0]["ratio"]) if rows else []
    head = ["task", "Adam GFLOP/step"] + [f"{c} × Adam" for c in contenders]
    head += ["break-even steps (curveball)"]
    if race_json is not None:
        head += ["race: step time × Adam", "race: steps × Adam"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for r in rows:
        ratio = r["ratio"]
        cells = [r["task"], f"{r['adam_flops'] / 1e9:.3f}"]
        cells += [f"{ratio[c]:.2f}" for c in contenders]
        cells.append(_cell(1.0 / ratio["curveball"] if "curveball" in ratio else None, ".2f"))
        if race_json is not None:
            time_ratio, step_ratio = measured(race_json, r["task"], "curveball")
            cells += [_cell(time_ratio, ".2f"), _cell(step_ratio, ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(race.TASKS), choices=list(race.TASKS))
    p.add_argument(
        "--contenders",
        nargs="+",
        default=["curveball", "curveball-minibatch"],
        choices=list(race.CURVEBALL_OPTIONS),
    )
    p.add_argument("--race", default=None, help="the race's --json output, to compare with")
    p.add_argument("--markdown", default=None, help="write the table to this file")
    args = p.parse_args(argv)
    rows = [count_task(race.TASKS[name], args.contenders) for name in args.tasks]
    race_json = None
    if args.race is not None:
        with open(args.race, encoding="utf-8") as f:
            race_json = json.load(f)
    print(markdown(rows, race_json))
    common.write_markdown(args.markdown, markdown(rows, race_json))
    return rows


if __name__ == "__main__":
    run()
