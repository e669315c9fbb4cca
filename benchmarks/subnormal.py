"""What subnormal numbers in ``z`` cost a step, with and without the sweep that zeroes them.

Along a direction whose gradient vanishes on most batches (an MNIST pixel near the border
that few images touch, a ReLU unit that rarely fires), ``z`` gets a kick now and then and
shrinks geometrically in between, through float32's subnormal numbers, where x86 CPUs
multiply in microcode (``curveball._subnormal``). This benchmark trains two copies of
the same seeded 784-512-512-10 ReLU MLP with CurveBall at its defaults on the same
MNIST mini-batches, one step of each in turn (the order alternating), one as the
library runs it and one with the sweep switched off, and prints each one's median step
time over the first and the second half of the run, the number of subnormal entries of
its ``z`` at the end and its final training loss.

``--synthetic`` replaces MNIST by Gaussian images whose outer pixels are zero in all
but one image in fifty (for the tests, and where the data is not at hand).

Example::

    python -m benchmarks.subnormal --steps 600 --markdown out/subnormal.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time
from collections.abc import Iterator
from unittest import mock

import torch
import torch.nn.functional as F

from benchmarks import common
from curveball import CurveBall, _subnormal

CONTENDERS = ("swept", "unswept")


def synthetic_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian 28 × 28 images whose pixels outside the central 20 × 20 are zero in all
    but one image in fifty, and random labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 1, 28, 28, generator=g)
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    rare = torch.rand(count, generator=g) < 0.02
    x[~rare] *= ~border
    return x, torch.randint(0, 10, (count,), generator=g)


def subnormal_entries(opt: CurveBall) -> int:
    """The entries of ``z`` that are subnormal numbers of their dtype."""
    count = 0
    for group in opt.param_groups:
        for p in group["params"]:
            z = opt.state[p].get("z")
            if z is not None and z.is_floating_point():
                tiny = torch.finfo(z.dtype).tiny
                count += int(((z != 0) & (z.abs() < tiny)).sum())
    return count


@contextlib.contextmanager
def sweep(on: bool) -> Iterator[None]:
    """The library as it runs (``on``) or with the sweep of ``curveball._subnormal`` off."""
    if on:
        yield
    else:
        with mock.patch.object(_subnormal, "due", lambda step: False):
            yield


def run(args: list[str] | None = None) -> dict:
    ns = parse_args(args)
    torch.set_num_threads(ns.threads)
    if ns.synthetic:
        x, t = synthetic_images(8000, ns.seed)
    else:
        split = common.mnist_8k_2k(ns.data_dir)
        x, t = split["x_train"], split["y_train"]
    torch.manual_seed(ns.seed)
    model = common.mlp()
    runs = {}
    for name in CONTENDERS:
        copy_ = copy.deepcopy(model)
        runs[name] = {"model": copy_, "opt": CurveBall(copy_), "times": [], "loss": None}
    g = torch.Generator().manual_seed(ns.seed + 1)
    for step in range(ns.steps):
        index = torch.randint(0, len(x), (ns.batch_size,), generator=g)
        xb, tb = x[index], t[index]
        order = CONTENDERS if step % 2 == 0 else CONTENDERS[::-1]
        for name in order:
            r = runs[name]
            with sweep(name == "swept"):
                start = time.perf_counter()
                loss, _ = r["opt"].step(
                    lambda m=r["model"], xb=xb: m(xb), lambda y, tb=tb: F.cross_entropy(y, tb)
                )
                r["times"].append(time.perf_counter() - start)
            r["loss"] = float(loss)
    half = ns.steps // 2
    rows = []
    for name, r in runs.items():
        times = r["times"]
        rows.append({
            "contender": name,
            "first_half_ms": 1e3 * statistics.median(times[:half] or times),
            "second_half_ms": 1e3 * statistics.median(times[half:]),
            "subnormal_z": subnormal_entries(r["opt"]),
            "final_loss": r["loss"],
        })  # fmt: skip
    result = {
        "data": "synthetic" if ns.synthetic else "mnist",
        "steps": ns.steps,
        "batch_size": ns.batch_size,
        "threads": ns.threads,
        "rows": rows,
    }
    table = format_table(result)
    print(table)
    common.write_markdown(ns.markdown, table)
    common.write_json(ns.json, result)
    return result


def format_table(result: dict) -> str:
    swept = {r["contender"]: r for r in result["rows"]}["swept"]
    lines = [
        f"{result['data']}, 784-512-512-10 ReLU MLP, batch {result['batch_size']}, "
        f"{result['steps']} steps, {result['threads']} threads",
        "",
        "| contender | median step, first half (ms) | second half (ms) "
        "| / swept (second half) | subnormal entries of z at the end | final loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        ratio = r["second_half_ms"] / swept["second_half_ms"]
        lines.append(
            f"| {r['contender']} | {r['first_half_ms']:.2f} | {r['second_half_ms']:.2f} | "
            f"{ratio:.2f} | {r['subnormal_z']} | {r['final_loss']:.4g} |"
        )
    return "\n".join(lines)


def parse_args(args: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=os.environ.get("CURVEBALL_DATA", "../shared/data"))
    p.add_argument("--synthetic", action="store_true", help="Gaussian images, no MNIST")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--markdown", default=None, metavar="PATH")
    ns = p.parse_args(args)
    if ns.steps < 2 or ns.batch_size < 1 or ns.threads < 1:
        p.error("--steps must be >= 2, --batch-size and --threads >= 1")
    return ns


if __name__ == "__main__":
    run()
