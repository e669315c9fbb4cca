"""Command line of the experiments: ``python -m curveball_experiments NAME [options]``.

``NAME`` is one of ``rosenbrock``, ``linear``, ``mnist``, ``cifar10``, ``imagenet``,
``random-archs`` or ``all`` (the two built-in problems, ``random-archs`` on MNIST or
on its synthetic fallback, and every data experiment whose files are under
``--data-dir``; the others are skipped with a message). Each experiment writes
``OUT/NAME/results.json``, ``OUT/NAME/table.md`` and PNG plots, and prints its table.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from curveball_experiments import EXPERIMENTS

DEFAULT_SEEDS = {
    "rosenbrock": 10,
    "linear": 10,
    "mnist": 1,
    "cifar10": 1,
    "imagenet": 1,
}
QUICK_SEEDS = {"rosenbrock": 3, "linear": 2}


def parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m curveball_experiments",
        description="Reproduce the experiments of the CurveBall paper "
        "(Henriques et al., ICCV 2019).",
    )
    p.add_argument("name", choices=[*EXPERIMENTS, "all"], help="experiment to run")
    p.add_argument("--quick", action="store_true", help="tiny version of every experiment (CI)")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="number of seeds (default: 10 for rosenbrock/linear, 1 for the networks)",
    )
    p.add_argument("--out", default="runs", help="output folder (default: runs)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with the datasets (default: $CURVEBALL_DATA); for MNIST the folder "
        "of the IDX files or its parent",
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the network experiments")
    p.add_argument(
        "--archs", type=int, default=None, help="random-archs: number of architectures (20)"
    )
    p.add_argument("--classes", type=int, default=None, help="imagenet: first K classes only")
    p.add_argument("--image-size", type=int, default=None, help="imagenet: image side (128)")
    p.add_argument(
        "--paper",
        action="store_true",
        help="CurveBall with curveball.PAPER_DEFAULTS (the authors' method) instead of its "
        "defaults; --curveball keywords apply on top",
    )
    p.add_argument(
        "--curveball",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        type=_keyword,
        help="CurveBall constructor keywords instead of its defaults, e.g. lambd=0.1 "
        "lambda_thresholds=(0.25,0.75) (values are Python literals)",
    )
    return p


def _keyword(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a Python literal value, for ``--curveball``."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"{key}: {value!r} is not a Python literal") from None


def _seeds(args: argparse.Namespace, name: str) -> list[int]:
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit("--seeds must be at least 1")
        return list(range(args.seeds))
    if args.quick:
        return list(range(QUICK_SEEDS.get(name, 1)))
    return list(range(DEFAULT_SEEDS.get(name, 1)))


def _data_present(name: str, data_dir: str | None) -> str | None:
    """``None`` when the data of ``name`` is available, else why it is not."""
    from curveball_experiments import datasets as c

    finders: dict[str, tuple[Callable[[str | None], Path | None], str]] = {
        "mnist": (c.find_mnist, "MNIST IDX files (t10k-/train-images-idx3-ubyte[.gz])"),
        "cifar10": (c.find_cifar10, "CIFAR-10 python batches (cifar-10-batches-py)"),
        "imagenet": (c.find_imagenet, "ImageNet-style folder (imagenet/train/<class>/)"),
    }
    if name not in finders:
        return None
    find, what = finders[name]
    if data_dir is None:
        return f"no --data-dir (or CURVEBALL_DATA) given, so no {what}"
    if find(data_dir) is None:
        return f"no {what} found in {data_dir}"
    return None


def run_one(name: str, args: argparse.Namespace, data_dir: str | None) -> str:
    """Run one experiment, write its outputs and return the table text."""
    from curveball_experiments import problems, runners

    device = torch.device(args.device)
    seeds = _seeds(args, name)
    out = Path(args.out)
    if name == "rosenbrock":
        report = problems.run_rosenbrock(out, seeds, args.quick, device)
    elif name == "linear":
        report = problems.run_linear(out, seeds, args.quick, device)
    elif name == "mnist":
        report = runners.run_mnist(out, data_dir, seeds, args.quick, device, args.epochs)
    elif name == "cifar10":
        report = runners.run_cifar10(out, data_dir, seeds, args.quick, device, args.epochs)
    elif name == "imagenet":
        report = runners.run_imagenet(
            out, data_dir, seeds, args.quick, device, args.epochs, args.classes, args.image_size
        )
    elif name == "random-archs":
        count = args.archs or (3 if args.quick else 20)
        report = runners.run_random_archs(out, data_dir, count, args.quick, device, args.epochs)
    else:  # pragma: no cover - argparse restricts the names
        raise ValueError(name)
    return report.write()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment(s) named on the command line; return the exit status."""
    from curveball_experiments.datasets import default_data_dir

    args = parser().parse_args(argv)
    from curveball_experiments import optimizers

    optimizers.CURVEBALL_OPTIONS.clear()
    if args.curveball or args.paper:
        from curveball import PAPER_DEFAULTS, CurveBall

        options = {**(PAPER_DEFAULTS if args.paper else {}), **dict(args.curveball)}
        CurveBall(torch.nn.Linear(1, 1), **options)  # a bad keyword or value fails here, now
        optimizers.CURVEBALL_OPTIONS.update(options)
    data_dir = default_data_dir(args.data_dir)
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    status = 0
    for name in names:
        missing = _data_present(name, data_dir)
        if missing is not None:
            if args.name == "all":
                print(f"{name}: skipped ({missing}).")
                continue
            print(f"{name}: cannot run: {missing}.", file=sys.stderr)
            return 2
        start = time.perf_counter()
        text = run_one(name, args, data_dir)
        print(text)
        print(f"{name}: wrote {Path(args.out) / name} in {time.perf_counter() - start:.1f} s\n")
        sys.stdout.flush()
    return status
