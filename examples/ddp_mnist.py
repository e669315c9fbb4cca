"""Data-parallel CurveBall on MNIST with ``torch.distributed``.

Every process holds a full copy of the model and its own ``CurveBall``; each
global batch is split into equal shards, one per process. The optimizer averages
the back-propagated vector and the few scalars of each step over the processes,
so all copies take exactly the step that one process would take on the whole
global batch (the model is not wrapped in ``DistributedDataParallel``).

Run on CPU with two processes::

    torchrun --standalone --nproc_per_node=2 -m examples.ddp_mnist --data-dir ../shared/data

from the repository root (``-m``: the example shares :mod:`benchmarks.common` with the
benchmarks). Without ``torchrun`` (``python -m examples.ddp_mnist ...``) it runs in a single
process. ``--data-dir`` holds the official MNIST test files (raw or gzip), directly or in an
``mnist`` sub-folder; they are split into 8,000 training and 2,000 validation images.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks.common import mlp, mnist_8k_2k
from curveball import CurveBall


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the MNIST IDX files")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--log-every", type=int, default=0, help="print every N steps (0: off)")
    return parser.parse_args()


def setup() -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes, if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: list[float], world: int) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def accuracy(model, x, y, rank: int, world: int, batch_size: int = 1000) -> float:
    """Validation accuracy; every process scores a contiguous share of the set."""
    model.eval()
    share = (len(x) + world - 1) // world
    xs, ys = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
    correct = 0
    for start in range(0, len(xs), batch_size):
        logits = model(xs[start : start + batch_size])
        correct += (logits.argmax(1) == ys[start : start + batch_size]).sum().item()
    model.train()
    total_correct, total = all_sum([correct, len(xs)], world)
    return total_correct / total


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    rank, world = setup()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by {world} processes")
    per_rank = args.batch_size // world

    data = mnist_8k_2k(args.data_dir)
    x_train, y_train = data["x_train"], data["y_train"]
    x_val, y_val = data["x_val"], data["y_val"]
    if rank == 0:
        print("MNIST: official test set; first 8,000 images train, last 2,000 validate")
        print(
            f"{world} process(es), global batch {args.batch_size} "
            f"({per_rank} per process), {len(x_train):,} training images"
        )

    torch.manual_seed(args.seed)
    model = mlp()
    if world > 1:  # identical start everywhere, whatever the seeding
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor, src=0)
    optimizer = CurveBall(model)

    steps_per_epoch = len(x_train) // args.batch_size  # full global batches only
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        # the same permutation on every process: seeded by the epoch
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch))
        loss_sum, counted, skipped = 0.0, 0, 0
        for step in range(steps_per_epoch):
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            mine = batch[rank * per_rank : (rank + 1) * per_rank]
            x, y = x_train[mine], y_train[mine]
            optimizer.step(lambda x=x: model(x), lambda out, y=y: F.cross_entropy(out, y))
            info = optimizer.last
            if info.skipped:
                skipped += 1
            else:
                loss_sum += info.loss  # already averaged over the processes
                counted += 1
            if args.log_every and rank == 0 and (step + 1) % args.log_every == 0:
                print(f"  step {step + 1:4d}  loss {info.loss:.4f}  λ {info.next_lambd:.4g}")
        val_acc = accuracy(model, x_val, y_val, rank, world)
        elapsed = time.perf_counter() - start
        if rank == 0:
            print(
                f"epoch {epoch}: train loss {loss_sum / max(counted, 1):.4f}, "
                f"val accuracy {100 * val_acc:.2f}%, λ {optimizer.lambd:.4g}, "
                f"{steps_per_epoch} steps ({skipped} skipped), {elapsed:.1f} s"
            )

    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
