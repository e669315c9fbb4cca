"""Communication and step time of data-parallel CurveBall against DDP + SGD.

Both contenders train the same seeded MLP (784-512-512-10, 669,706 float32
parameters) on a fixed synthetic MNIST-shaped global batch (128 by default),
split evenly over 1 or 2 CPU processes (``gloo``, one torch thread per process
unless ``--threads`` says otherwise):

``curveball``
    ``CurveBall(model)`` on the plain module. Its collectives go through
    ``torch.distributed.all_reduce``, which the benchmark wraps to count every
    call and its payload (``numel * element_size``).
``ddp-sgd``
    ``DistributedDataParallel(model)`` with ``torch.optim.SGD(lr=0.01,
    momentum=0.9)``. DDP all-reduces its gradient buckets from C++, so a
    communication hook (``register_comm_hook``) records each bucket's size and
    then performs the usual averaging all-reduce.

The byte counts are payloads handed to all-reduce per process and per step (the
traffic on the wire is a fixed multiple of them that depends on the all-reduce
algorithm, the same for both). They are averaged over a whole number of
trust-region cycles, so CurveBall's extra scalar every ``lambda_interval`` steps
is included. A single process communicates nothing for CurveBall (the averaging
is skipped), while DDP still runs its hook.

Step times are medians over ``--repeats`` blocks of ``--steps`` steps each, the
two contenders alternating block by block, with a barrier around every block;
the slowest process's time counts. On a machine with fewer free cores than
processes the 2-process times are not meaningful as a speed-up.

Example::

    python -m benchmarks.distributed_comm --json out/distributed_comm.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from benchmarks.common import count_parameters, mlp, write_markdown
from curveball import CurveBall

CONTENDERS = ("curveball", "ddp-sgd")


class CommLog:
    """Counts all-reduce calls and their payload bytes."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.bytes = 0
        self.sizes: Counter[int] = Counter()

    def record(self, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        self.calls += 1
        self.bytes += size
        self.sizes[size] += 1


def install_counter(log: CommLog):
    """Wrap ``torch.distributed.all_reduce``; returns the original function."""
    original = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        log.record(tensor)
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    return original


def ddp_counting_hook(log: CommLog, all_reduce):
    """A DDP communication hook: record the bucket, then average it over the group."""

    def hook(state, bucket):
        buffer = bucket.buffer()
        log.record(buffer)
        buffer.div_(dist.get_world_size())
        future = all_reduce(buffer, async_op=True).get_future()
        return future.then(lambda fut: fut.value()[0])

    return hook


def make_batch(global_batch: int, rank: int, world: int):
    gen = torch.Generator().manual_seed(1234)
    x = torch.rand(global_batch, 1, 28, 28, generator=gen)
    t = torch.randint(0, 10, (global_batch,), generator=gen)
    per = global_batch // world
    return x[rank * per : (rank + 1) * per], t[rank * per : (rank + 1) * per]


def _sgd_step(ddp, sgd: torch.optim.Optimizer, x: torch.Tensor, t: torch.Tensor) -> None:
    sgd.zero_grad(set_to_none=True)
    F.cross_entropy(ddp(x), t).backward()
    sgd.step()


def worker(rank: int, world: int, init_file: str, args, out_file: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    log = CommLog()
    all_reduce = install_counter(log)
    x, t = make_batch(args.batch_size, rank, world)

    torch.manual_seed(0)
    cb_model = mlp()
    curveball = CurveBall(cb_model)

    def curveball_step() -> None:
        curveball.step(lambda: cb_model(x), lambda y: F.cross_entropy(y, t))

    torch.manual_seed(0)
    ddp = torch.nn.parallel.DistributedDataParallel(mlp())
    ddp.register_comm_hook(None, ddp_counting_hook(log, all_reduce))
    sgd = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)

    steps = {"curveball": curveball_step, "ddp-sgd": partial(_sgd_step, ddp, sgd, x, t)}
    # communication: a whole number of trust-region cycles, after one warm-up step
    cycle = curveball.param_groups[0]["lambda_interval"]
    comm = {}
    for name, step in steps.items():
        step()
        log.reset()
        count = cycle * max(1, args.steps // cycle)
        for _ in range(count):
            step()
        comm[name] = {
            "calls_per_step": log.calls / count,
            "bytes_per_step": log.bytes / count,
            "payload_sizes": dict(sorted(log.sizes.items(), reverse=True)),
        }
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(args.repeats):
        order = list(steps) if repeat % 2 == 0 else list(reversed(steps))
        for name in order:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            elapsed = torch.tensor([(time.perf_counter() - start) / args.steps])
            all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest process counts
            times[name].append(elapsed.item())
    if rank == 0:
        result = {
            name: {
                **comm[name],
                "step_ms": 1000 * statistics.median(times[name]),
                "step_ms_all": [1000 * v for v in times[name]],
            }
            for name in steps
        }
        with open(out_file, "w") as f:
            json.dump(result, f)
    # DDP's reducer and gloo's pairs are torn down only when every process is done with
    # them: a process that leaves early aborts the other one's last collective
    del steps, step, ddp, sgd
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.json")
        mp.spawn(
            worker,
            args=(world, os.path.join(tmp, "init"), args, out_file),
            nprocs=world,
            join=True,
        )
        with open(out_file) as f:
            return json.load(f)


def table(rows: list[dict], param_bytes: int) -> str:
    lines = [
        "| optimizer | processes | batch / process | all-reduce calls / step "
        "| bytes / step / process | x parameter bytes | step ms (median) | x 1 process |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    single = {r["optimizer"]: r["step_ms"] for r in rows if r["processes"] == 1}
    for r in rows:
        base = single.get(r["optimizer"])
        speed = f"{base / r['step_ms']:.2f}" if base else "-"
        lines.append(
            f"| {r['optimizer']} | {r['processes']} | {r['batch_per_process']} "
            f"| {r['calls_per_step']:.1f} | {r['bytes_per_step']:,.1f} "
            f"| {r['bytes_per_step'] / param_bytes:.5f} | {r['step_ms']:.1f} | {speed} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per contender")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--markdown", default=None, help="write the table to this file")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    for world in args.world_sizes:
        if world < 1 or args.batch_size % world:
            raise SystemExit(f"--batch-size {args.batch_size} is not divisible by {world}")
    model = mlp()
    n_params = count_parameters(model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for world in args.world_sizes:
        result = run(world, args)
        for name in CONTENDERS:
            rows.append(
                {
                    "optimizer": name,
                    "processes": world,
                    "batch_per_process": args.batch_size // world,
                    **result[name],
                }
            )
    print(
        f"mlp 784-512-512-10: {n_params:,} parameters ({param_bytes:,} bytes), "
        f"global batch {args.batch_size}, gloo on CPU, {args.threads} thread(s) per process, "
        f"{os.cpu_count()} CPU(s)"
    )
    print(table(rows, param_bytes))
    write_markdown(args.markdown, table(rows, param_bytes))
    for row in rows:
        if row["processes"] > 1:
            sizes = ", ".join(f"{k} B x{v}" for k, v in row["payload_sizes"].items())
            print(f"  {row['optimizer']} ({row['processes']} processes) payloads: {sizes}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {
                    "model": "mlp 784-512-512-10",
                    "parameters": n_params,
                    "parameter_bytes": param_bytes,
                    "global_batch": args.batch_size,
                    "threads_per_process": args.threads,
                    "argv": sys.argv[1:] if argv is None else list(argv),
                    "rows": rows,
                },
                f,
                indent=2,
            )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
