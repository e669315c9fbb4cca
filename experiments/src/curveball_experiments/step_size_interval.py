"""What refreshing ρ and β only every k steps costs in training and saves in time.

``CurveBall(step_size_interval=k)`` solves the 2×2 system for the momentum ρ and the
step β at every k-th step only (and at every trust-region test) and reuses the last
values in between, which skips the second forward-mode pass on those steps. This
script trains the paper's MNIST MLP (784-128-64-32-10, tanh; batch 128) with
CurveBall with the paper's settings (``PAPER_DEFAULTS``) for each k, on the same initial weights
and mini-batch order, and reports
per epoch the cross-entropy over the whole training split, the validation accuracy
and the training wall-clock, plus the mean time of one step.

Data: the MNIST IDX files under ``--data-dir`` (with only the official test files
present they are split 8,000 / 2,000, as in ``python -m curveball_experiments
mnist``). ``--quick`` trains on a small synthetic task instead (for the tests).

Example::

    python -m curveball_experiments.step_size_interval --data-dir ../shared/data \
        --intervals 1 2 5 10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

import torch

from curveball import PAPER_DEFAULTS, CurveBall
from curveball_experiments import datasets, models, training
from curveball_experiments.optimizers import CurveBallStepper


def parse_args(args: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files")
    p.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 5, 10], metavar="K")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (0, 1, ...)")
    p.add_argument("--out", type=Path, default=Path("runs/step_size_interval"))
    p.add_argument("--quick", action="store_true", help="small synthetic task, 1 epoch")
    ns = p.parse_args(args)
    if any(k < 1 for k in ns.intervals) or ns.epochs < 1 or ns.seeds < 1:
        p.error("--intervals, --epochs and --seeds must be >= 1")
    return ns


def load(ns: argparse.Namespace) -> tuple[datasets.Dataset, int]:
    """The dataset and its input size."""
    if ns.quick:
        data = datasets.synthetic_dataset(seed=0, train=512, val=128)
        return data, data.x_train[0].numel()
    folder = datasets.find_mnist(datasets.default_data_dir(ns.data_dir))
    if folder is None:
        raise SystemExit(f"no MNIST IDX files in {ns.data_dir} (use --quick for a synthetic task)")
    data = datasets.load_mnist_dataset(folder)
    return data, data.x_train[0].numel()


def format_table(result: dict) -> str:
    epochs = result["epochs"]
    head = " | ".join(f"loss @{e}" for e in range(1, epochs + 1))
    lines = [
        f"| k | step (ms) | {head} | val acc @{epochs} |",
        "|---:|---:|" + "---:|" * epochs + "---:|",
    ]
    for r in result["rows"]:
        losses = " | ".join(f"{v:.4f}" for v in r["train_loss"][1:])
        lines.append(
            f"| {r['k']} | {r['step_ms']:.2f} | {losses} | {100 * r['val_accuracy'][-1]:.2f}% |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in result["rows"]:
        ax1.plot(range(len(r["train_loss"])), r["train_loss"], marker="o", label=f"k={r['k']}")
        ax2.plot(r["seconds"], r["train_loss"], marker="o", label=f"k={r['k']}")
    for ax, xlabel in ((ax1, "epoch"), (ax2, "training time (s)")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss (whole split)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"CurveBall, ρ and β refreshed every k steps ({result['dataset']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: list[str] | None = None) -> dict:
    ns = parse_args(args)
    dataset, features = load(ns)
    epochs = 1 if ns.quick else ns.epochs
    settings = training.TrainSettings(epochs=epochs, batch_size=64 if ns.quick else 128)
    device = torch.device("cpu")
    print(dataset.describe(), flush=True)

    def build() -> torch.nn.Module:
        return models.mlp(features, (128, 64, 32), dataset.num_classes, activation="tanh")

    def stepper(k: int):
        options = {**PAPER_DEFAULTS, "step_size_interval": k}  # the study's setting
        return lambda m: CurveBallStepper(CurveBall(m, **options))

    # Untimed warm-up, so that the first k measured does not pay for it.
    warm = dataset.subset(3 * settings.batch_size, settings.batch_size)
    training.train(build, warm, stepper(ns.intervals[0]), 0, settings, device)
    rows = []
    for k in ns.intervals:
        logs = [
            training.train(build, dataset, stepper(k), seed, settings, device)
            for seed in range(ns.seeds)
        ]
        steps = len(logs[0].batch_loss)

        row = {
            "k": k,
            "step_ms": 1e3 * median([lg.seconds[-1] for lg in logs]) / steps,
            "train_loss": [median([lg.train_loss[e] for lg in logs]) for e in range(epochs + 1)],
            "val_accuracy": [
                median([lg.val_accuracy[e] for lg in logs]) for e in range(epochs + 1)
            ],
            "seconds": [median([lg.seconds[e] for lg in logs]) for e in range(epochs + 1)],
        }
        rows.append(row)
        print(f"k={k}: {row['step_ms']:.2f} ms/step, loss {row['train_loss'][-1]:.4f}", flush=True)
    result = {
        "dataset": dataset.describe(),
        "epochs": epochs,
        "batch_size": settings.batch_size,
        "seeds": ns.seeds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    table = format_table(result)
    print()
    print(table)
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (ns.out / "table.md").write_text(table + "\n")
    plot(result, ns.out / "loss.png")
    print(f"\nwrote {ns.out}/results.json, table.md, loss.png")
    return result


if __name__ == "__main__":
    run(sys.argv[1:])
