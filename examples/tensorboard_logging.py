"""Log every CurveBall step to TensorBoard, then plot what TensorBoard recorded.

Trains the paper's MNIST MLP (784-128-64-32-10, tanh) with CurveBall at its
defaults on the official MNIST test files (first 8,000 images) and writes ρ, β, λ,
the trust ratio and the loss of every step with ``torch.utils.tensorboard``
(``StepInfo.as_dict()`` gives plain floats, so any tracker takes them the same
way). ``--plot`` reads the event files back and draws the curves::

    python -m examples.tensorboard_logging --data-dir ../shared/data --epochs 2 \\
        --logdir runs/tensorboard --plot docs/tensorboard_curves.png
    tensorboard --logdir runs/tensorboard
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from benchmarks.common import mlp, mnist_8k_2k
from curveball import CurveBall

LOGGED = ("loss", "rho", "beta", "lambd", "trust_ratio")


def train(data_dir: str, epochs: int, logdir: str, batch_size: int = 128) -> None:
    data = mnist_8k_2k(data_dir)
    x_train, y_train = data["x_train"], data["y_train"]
    torch.manual_seed(0)
    model = mlp((784, 128, 64, 32, 10), nn.Tanh)
    optimizer = CurveBall(model)
    writer = SummaryWriter(logdir)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = order[start : start + batch_size]
            x, t = x_train[batch], y_train[batch]
            optimizer.step(lambda x=x: model(x), lambda y, t=t: F.cross_entropy(y, t))
            step += 1
            values = optimizer.last.as_dict()
            for name in LOGGED:
                if math.isfinite(values[name]):  # the trust ratio exists on test steps only
                    writer.add_scalar(f"curveball/{name}", values[name], step)
        print(f"epoch {epoch + 1}: last loss {optimizer.last.loss:.4f}, λ {optimizer.lambd:.4g}")
    writer.close()


def plot(logdir: str, path: str) -> None:
    """Draw the scalars that TensorBoard recorded in ``logdir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logdir)
    events.Reload()
    fig, axes = plt.subplots(1, len(LOGGED), figsize=(3.2 * len(LOGGED), 2.8))
    for ax, name in zip(axes, LOGGED, strict=True):
        scalars = events.Scalars(f"curveball/{name}")
        ax.plot([s.step for s in scalars], [s.value for s in scalars], lw=0.8)
        ax.set_title({"lambd": "λ", "rho": "ρ", "beta": "β"}.get(name, name.replace("_", " ")))
        ax.set_xlabel("step")
        if name in ("loss",):
            ax.set_yscale("log")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the MNIST test files")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--logdir", default="runs/tensorboard")
    parser.add_argument("--plot", default=None, help="write a PNG of the logged curves here")
    args = parser.parse_args()
    train(args.data_dir, args.epochs, args.logdir)
    if args.plot:
        plot(args.logdir, args.plot)


if __name__ == "__main__":
    main()
