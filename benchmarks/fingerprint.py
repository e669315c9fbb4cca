"""A fingerprint of CurveBall's trajectories: a hash of every bit they produce.

Runs a fixed set of short trainings — the paper's settings and the defaults, on
an MLP, a batch-norm CNN, an LSTM and a transformer, with weight decay and two
parameter groups, ρ/β reuse, a curvature mini-batch, fixed ρ and β, float16
parameters and a rejected step — and hashes the bytes of every loss, every
parameter, ``z``, the preconditioner's average, the buffers and λ after each step.
Two commits with the same fingerprint compute the same results to the last bit;
a refactoring that claims to change nothing is checked this way::

    python -m benchmarks.fingerprint            # prints one hash per case and overall
    git stash; python -m benchmarks.fingerprint  # ... and compare with another commit
"""

from __future__ import annotations

import argparse
import hashlib
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common
from curveball import PAPER_DEFAULTS, CurveBall, losses

STEPS = 12
RECORD = ("step", "loss", "rho", "beta", "lambd", "next_lambd", "predicted_change",
          "trust_ratio", "refreshed", "skipped", "reason", "engine")  # fmt: skip
"""The fields of ``optimizer.last`` that are hashed (those of release 0.2.0)."""


def _update(h: hashlib._Hash, tensors) -> None:
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())


def _batch(seed: int, shape: tuple[int, ...], classes: int, rows: int | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    t = torch.randint(0, classes, (rows or shape[0],), generator=g)
    return x, t


class _Tokens(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.embedding, self.net, self.head = nn.Embedding(13, 16), net, nn.Linear(16, 13)

    def forward(self, tokens):
        out = self.net(self.embedding(tokens))
        out = out[0] if isinstance(out, tuple) else out
        return self.head(out).flatten(0, 1)


def _transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
    return _Tokens(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False))


def _models() -> dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple]]]:
    tokens = lambda seed: (  # noqa: E731
        torch.randint(0, 13, (4, 6), generator=torch.Generator().manual_seed(seed)),
        torch.randint(0, 13, (24,), generator=torch.Generator().manual_seed(seed + 1)),
    )
    return {
        "mlp": (lambda: common.mlp((10, 16, 16, 4), nn.Tanh), lambda s: _batch(s, (8, 10), 4)),
        "bn-cnn": (
            lambda: nn.Sequential(
                nn.Conv2d(2, 4, 3, padding=1),
                nn.BatchNorm2d(4),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(16, 3),
            ),
            lambda s: _batch(s, (6, 2, 4, 4), 3),
        ),  # fmt: skip
        "lstm": (lambda: _Tokens(nn.LSTM(16, 16, batch_first=True)), tokens),
        "transformer": (_transformer, tokens),
    }


CASES: dict[str, tuple[str, dict]] = {
    "mlp-defaults": ("mlp", {}),
    "mlp-paper": ("mlp", dict(PAPER_DEFAULTS)),
    "mlp-groups-decay": ("mlp", {"groups": True, "weight_decay": 1e-3}),
    "mlp-lazy": ("mlp", {"step_size_interval": 3}),
    "mlp-minibatch": ("mlp", {"curvature_fraction": 0.5}),
    "mlp-fixed-sizes": ("mlp", {"momentum": 0.9, "beta": 0.01}),
    "mlp-rejecting": ("mlp", {"lambd": 1e-4, "lambda_interval": 1}),
    "mlp-float16": ("mlp", {"dtype": torch.float16}),
    "mlp-double-backward": ("mlp", {"forward_mode": "double-backward"}),
    "bn-cnn-defaults": ("bn-cnn", {}),
    "bn-cnn-paper": ("bn-cnn", dict(PAPER_DEFAULTS)),
    "lstm-defaults": ("lstm", {}),
    "transformer-defaults": ("transformer", {}),
}


def _optimizer(model: nn.Module, options: dict) -> CurveBall:
    options = dict(options)
    options.pop("dtype", None)
    if options.pop("groups", False):
        params = list(model.parameters())
        groups = [{"params": params[:2], "lr": 0.5}, {"params": params[2:]}]
        return CurveBall(groups, model=model, **options)
    return CurveBall(model, **options)


def fingerprint(case: str) -> str:
    """The hash of one case's trajectory."""
    name, options = CASES[case]
    build, batch = _models()[name]
    torch.manual_seed(0)
    model = build().to(options.get("dtype", torch.float32))
    opt = _optimizer(model, options)
    h = hashlib.sha256()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for step in range(STEPS):
            x, t = batch(step % 3)
            x = x.to(options["dtype"]) if "dtype" in options and x.is_floating_point() else x
            closed = losses.cross_entropy(t)
            loss_fn = closed if step % 2 else (lambda y, t=t: F.cross_entropy(y, t))
            loss, _ = opt.step(lambda x=x: model(x), loss_fn)
            _update(h, [loss, *model.parameters(), *model.buffers()])
            _update(h, [s[k] for p in model.parameters() for k, s in [("z", opt.state[p])]])
            _update(h, [s["dz_square_average"] for s in opt.state.values()
                        if "dz_square_average" in s])  # fmt: skip
            h.update(repr((opt.lambd, [getattr(opt.last, f) for f in RECORD])).encode())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # reductions in one thread: the same order on every machine
    out = {case: fingerprint(case) for case in args.cases}
    total = hashlib.sha256("".join(out.values()).encode()).hexdigest()
    for case, digest in out.items():
        print(f"{case:24s} {digest[:16]}")
    print(f"{'all':24s} {total[:16]}")
    return out


if __name__ == "__main__":
    main()
