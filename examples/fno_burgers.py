"""A Fourier neural operator trained with CurveBall on the 1D Burgers equation.

The operator is the FNO paper's first problem (Li et al., ICLR 2021, arXiv:2010.08895):
``u₀ ↦ u(·, 1)`` for ``∂ₜu + ∂ₓ(u²/2) = 0.1 ∂ₓₓu`` on the periodic unit interval, with
``u₀ ~ N(0, 625 (−Δ + 25 I)⁻²)``. The pairs come from the pseudo-spectral solver of
:mod:`benchmarks.operator_data` (solved on 512 points, kept at 128, cached on disk after
the first run: ``--cache``, ``$CURVEBALL_CACHE`` or ``~/.cache/curveball-benchmarks``). The
model is ``neuralop.models.FNO`` with 16 modes and 32 channels, whose spectral weights are
complex parameters; CurveBall minimises the squared relative error
``mean_i ‖y_i − t_i‖² / ‖t_i‖²`` and the example reports the FNO paper's metric, the mean
relative L2 error ``‖y_i − t_i‖ / ‖t_i‖`` on held-out pairs, on its last line.

It needs ``neuraloperator`` (``pip install curveball[operators]``). Run from the
repository root (``-m``: it shares the data solvers with the benchmarks)::

    python -m examples.fno_burgers --epochs 30
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks import operator_data
from benchmarks.operator_race import relative_l2, squared_relative_l2
from curveball import CurveBall


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=256, help="training pairs")
    parser.add_argument("--test", type=int, default=64, help="test pairs")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=20, help="the FNO paper's: 20")
    parser.add_argument("--channels", type=int, default=32, help="the FNO's width")
    parser.add_argument("--cache", default=None, help="the data cache folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def burgers_tensors(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The cached pairs as ``(pairs, 1, 128)`` tensors: inputs standardised, targets
    divided by their root mean square (training-set scalars; relative errors unchanged)."""
    spec = operator_data.DataSpec("burgers", args.train, args.test, fine=512, resolution=128)
    arrays = operator_data.load(spec, args.cache)
    keys = ("x_train", "y_train", "x_test", "y_test")
    data = {k: torch.from_numpy(arrays[k]).unsqueeze(1) for k in keys}
    mean, std = data["x_train"].mean(), data["x_train"].std()
    scale = data["y_train"].pow(2).mean().sqrt()
    return {k: (v - mean) / std if k.startswith("x") else v / scale for k, v in data.items()}


@torch.no_grad()
def test_error(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The mean relative L2 error on ``(x, y)``, in evaluation mode."""
    model.eval()
    error = float(relative_l2(model(x), y))
    model.train()
    return error


def train(model: torch.nn.Module, data: dict[str, torch.Tensor], args) -> float:
    """``args.epochs`` epochs of CurveBall on shuffled batches; the final test error."""
    optimizer = CurveBall(model)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(data["x_train"]), generator=generator)
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            batch = order[i : i + args.batch_size]
            x, t = data["x_train"][batch], data["y_train"][batch]
            optimizer.step(lambda x=x: model(x), lambda y, t=t: squared_relative_l2(y, t))
        error = test_error(model, data["x_test"], data["y_test"])
        print(f"epoch {epoch:3d}  {time.perf_counter() - start:6.1f} s  test rel. L2 {error:.4f}")
    return error


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from neuralop.models import FNO

    data = burgers_tensors(args)
    torch.manual_seed(args.seed)
    model = FNO(n_modes=(16,), hidden_channels=args.channels, in_channels=1, out_channels=1)
    error = train(model, data, args)
    print(f"test relative L2 error: {error:.4f}")


if __name__ == "__main__":
    main()
