"""Wall time of one optimization step: CurveBall against SGD, Adam and its own cost floor.

For every model the script times one full optimization step of several contenders and reports
the median over ``--repeats`` repetitions, measured after ``--warmup`` untimed steps.  The
contenders are timed *interleaved*: each repetition runs one step of every contender in turn
(round-robin, with the starting contender rotated every repetition), so a burst of machine
noise or a change of clock speed hits all contenders alike instead of biasing whichever one
happened to run at that moment.  Every contender owns a fresh copy of the same seeded model,
so the updates of one never change the work done by another.

Contenders
----------
``sgd``
    ``torch.optim.SGD(lr=0.01, momentum=0.9)``: zero_grad, forward, cross-entropy, backward,
    step.  This is the cost of a plain first-order step.
``adam``
    ``torch.optim.Adam(lr=1e-3)``, same loop.
``curveball``
    ``CurveBall(model)`` at its defaults (forward-mode AD chosen automatically).
``curveball-paper``
    ``CurveBall(model, **PAPER_DEFAULTS)``, the authors' settings: the same passes without
    the preconditioner's element-wise work.
``curveball-double-backward``
    ``CurveBall(model, forward_mode="double-backward")``: the fallback way of computing
    Jacobian-vector products (a backward pass of a backward pass), forced.
``older-double-backward``
    A CurveBall step (automatic ρ and β, fixed λ = 1, no trust-region test) computed the way
    earlier PyTorch implementations of the method compute it, written here without the
    library: each Jacobian-vector product gets its own backward pass with ``create_graph``
    from a dummy cotangent, followed by a backward pass through that one; the loss Hessian
    products come from double backward of the loss.  The reference for "forward mode pays off".
``ideal``
    The cost floor of the method, written here with ``torch.autograd.forward_ad`` and no use
    of the library: one forward pass with dual parameters (tangent = a fixed random direction)
    while building the autograd graph, one ``torch.autograd.grad`` through that graph (run
    after the dual level is closed, so the backward pass carries no tangents), and one more
    forward pass with dual parameters under ``torch.no_grad()`` (tangent only).
    That is the Jacobian-vector product, the vector-Jacobian product and the extra
    Jacobian-vector product a CurveBall step needs, with no optimizer bookkeeping at all.
``authors`` (``--authors PATH``)
    The authors' PyTorch implementation (``curveball.py`` of github.com/jotaf98/pytorch-curveball,
    a local copy at ``PATH``, never part of this repository), with the settings of its MNIST
    example: automatic ρ and β (``lr=-1, momentum=-1``), λ = 1 with its trust-region rule.
    Its Jacobian products come from double backward, and it reads its 2×2 system with five
    host transfers.
``curveball-k{K}`` (``--step-size-interval K``)
    CurveBall that re-solves the step sizes only every K steps.
``curveball-compiled`` (``--compile``)
    CurveBall driving a ``torch.compile``-wrapped model; dropped with a message if
    compilation fails.

Reading the ratios
------------------
``x sgd`` is a contender's median divided by the SGD median of the same model: how many SGD
steps fit in the time of one of its steps.  A forward+backward step costs roughly three
forward passes, and the ideal CurveBall step roughly two forward-mode passes plus a backward
pass, so ``ideal`` is expected to land somewhat above 1x SGD (forward-mode passes cost more
than plain forward passes: they carry a tangent alongside every activation).
``x ideal`` is the median divided by the ``ideal`` median: the overhead of the library over
the bare AD work it cannot avoid.  A value close to 1 means the implementation adds little;
``curveball-double-backward`` shows what the fallback path costs in comparison.

Peak memory is measured on CUDA only (``torch.cuda.max_memory_allocated``), in a separate,
non-interleaved pass after the timing: each contender is rebuilt alone, takes one untimed
step, then the peak statistics are reset and a few more steps are run.  The peak therefore
covers the batch, that contender's model, gradients, optimizer state and activations.

Example::

    python -m benchmarks.step_time --models mlp cnn --repeats 15 --json out/step_time.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from benchmarks import common

BASE_METHODS = (
    "sgd",
    "adam",
    "curveball",
    "curveball-paper",
    "curveball-double-backward",
    "older-double-backward",
    "ideal",
    "ideal-lean",
)
MODEL_CHOICES = ("mlp", "cnn", "resnet18", "tiny")
TINY_FEATURES = 20
TINY_CLASSES = 10
MEMORY_STEPS = 3


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


class Workload:
    """A seeded model (kept on the CPU, copied per contender) and one fixed batch."""

    def __init__(
        self, name: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor, batch_size: int
    ) -> None:
        self.name = name
        self.model = model
        self.x = x
        self.t = t
        self.batch_size = batch_size


def _build_model(name: str) -> tuple[nn.Module, list[tuple[int, ...]]]:
    """Return the model and the candidate per-sample input shapes, tried in order."""
    if name == "tiny":
        model = nn.Sequential(nn.Linear(TINY_FEATURES, 32), nn.ReLU(), nn.Linear(32, TINY_CLASSES))
        return model, [(TINY_FEATURES,)]

    if name == "mlp":
        return common.mlp(), [(1, 28, 28), (784,)]
    if name == "cnn":
        return common.basic_cnn(batch_norm=False), [(3, 32, 32)]
    if name == "resnet18":
        return common.resnet18(), [(3, 32, 32)]
    raise ValueError(f"unknown model {name!r}")


def make_workload(name: str, batch_size: int, device: torch.device, seed: int) -> Workload:
    torch.manual_seed(seed)
    model, shapes = _build_model(name)
    model.train()

    # Find the input layout the model accepts and its number of classes with a tiny probe on
    # a scratch copy (so the probe leaves no trace, e.g. in batch-norm running statistics).
    probe_model = copy.deepcopy(model)
    errors = []
    for shape in shapes:
        try:
            with torch.no_grad():
                out = probe_model(torch.zeros(2, *shape))
        except Exception as exc:  # noqa: BLE001 - any failure means "try the next layout"
            errors.append(f"{shape}: {exc}")
            continue
        num_classes = out.shape[-1]
        break
    else:
        raise RuntimeError(f"model {name!r} accepts none of the input shapes: {errors}")

    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch_size, *shape, generator=gen).to(device)
    t = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    return Workload(name, model, x, t, batch_size)


# --------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------


class Contender:
    """One method on its own copy of the model; ``step()`` runs one optimization step."""

    def __init__(self, method: str, step: Callable[[], object]) -> None:
        self.method = method
        self.step = step
        self.times: list[float] = []


def _first_order_step(model: nn.Module, opt: torch.optim.Optimizer, x, t) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        opt.step()

    return step


def _curveball_step(model: nn.Module, x, t, **kwargs) -> Callable[[], object]:
    from curveball import CurveBall

    opt = CurveBall(model, **kwargs)

    def step() -> object:
        return opt.step(lambda: model(x), lambda out: F.cross_entropy(out, t))

    return step


def _older_step(model: nn.Module, x, t) -> Callable[[], object]:
    """A CurveBall step with every J-product by a fresh double backward (see the docstring)."""
    params = [p for p in model.parameters() if p.requires_grad]
    zs = [torch.zeros_like(p) for p in params]
    lambd = 1.0

    def jvp(y: torch.Tensor, tangents: list[torch.Tensor]) -> torch.Tensor:
        dummy = torch.zeros_like(y, requires_grad=True)
        back = torch.autograd.grad(y, params, dummy, create_graph=True)
        (out,) = torch.autograd.grad(back, dummy, tangents)
        return out

    def step() -> None:
        y = model(x)
        y_leaf = y.detach().requires_grad_(True)
        (j_loss,) = torch.autograd.grad(F.cross_entropy(y_leaf, t), y_leaf, create_graph=True)
        jz = jvp(y, zs)
        (h_jz,) = torch.autograd.grad(j_loss, y_leaf, jz, retain_graph=True)
        grads = torch.autograd.grad(y, params, h_jz + j_loss.detach(), retain_graph=True)
        dz = [g + lambd * z for g, z in zip(grads, zs, strict=True)]
        jdz = jvp(y, dz)
        (h_jdz,) = torch.autograd.grad(j_loss, y_leaf, jdz)

        def dots(a, b) -> torch.Tensor:
            return sum((u * v).sum() for u, v in zip(a, b, strict=True))

        a11 = (jdz * h_jdz).sum() + lambd * dots(dz, dz)
        a12 = (jz * h_jdz).sum() + lambd * dots(zs, dz)
        a22 = (jz * h_jz).sum() + lambd * dots(zs, zs)
        b = torch.stack([(j_loss.detach() * jdz).sum(), (j_loss.detach() * jz).sum()])
        system = torch.stack([torch.stack([a11, a12]), torch.stack([a12, a22])])
        beta, minus_rho = (torch.linalg.pinv(system.double()) @ b.double()).tolist()
        with torch.no_grad():
            for p, z, d in zip(params, zs, dz, strict=True):
                z.mul_(-minus_rho).add_(d, alpha=-beta)
                p.add_(z)

    return step


def _ideal_step(model: nn.Module, x, t, seed: int, lean: bool) -> Callable[[], object]:
    """The bare AD work of a CurveBall step: JVP + VJP through one graph, then one more JVP."""
    from curveball._curvature.lean_rules import LeanTangents

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed + 2)
    tangents = [torch.randn(p.shape, generator=gen).to(p) for p in params]

    def dual_params(detached: bool = False) -> dict[str, torch.Tensor]:
        primals = [p.detach() for p in params] if detached else params
        return {n: fwAD.make_dual(p, v) for n, p, v in zip(names, primals, tangents, strict=True)}

    # Fixed vector for the backward pass, shaped like the output (the role of H_L J v + g).
    with torch.no_grad():
        out_shape = model(x).shape
    grad_out = torch.randn(out_shape, generator=gen).to(x.device)

    def rules(level: int, replay=None, record: bool = False):
        return LeanTangents(level, replay, record) if lean else contextlib.nullcontext()

    def step() -> tuple[torch.Tensor, ...]:
        with fwAD.dual_level() as level, rules(level, record=True) as first:
            out = functional_call(model, dual_params(), (x,))
            primal, tangent = fwAD.unpack_dual(out)
        # Backward once the dual level is closed: inside it, the tensors saved for backward are
        # still dual and the backward pass would drag tangents along (forward-over-reverse),
        # roughly doubling its cost for nothing.
        grads = torch.autograd.grad(primal, params, grad_outputs=grad_out)
        records = first.records if lean else None
        # Detached parameters record no graph; grad mode stays on, as in the library's pass.
        with fwAD.dual_level() as level, rules(level, replay=records):
            out2 = functional_call(model, dual_params(detached=True), (x,))
            tangent2 = fwAD.unpack_dual(out2).tangent
        if tangent is None or tangent2 is None:
            raise RuntimeError("forward-mode AD produced no tangent for the model output")
        return grads

    # Verified once, untimed: the forward-mode passes really carry a tangent.
    step()
    return step


def make_contender(
    method: str,
    work: Workload,
    device: torch.device,
    seed: int,
    step_size_interval: int,
    authors=None,
) -> Contender:
    model = copy.deepcopy(work.model).to(device)
    model.train()
    x, t = work.x, work.t
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        return Contender(method, _first_order_step(model, opt, x, t))
    if method == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        return Contender(method, _first_order_step(model, opt, x, t))
    if method == "curveball":
        return Contender(method, _curveball_step(model, x, t))
    if method == "curveball-paper":
        from curveball import PAPER_DEFAULTS

        return Contender(method, _curveball_step(model, x, t, **PAPER_DEFAULTS))
    if method == "curveball-double-backward":
        return Contender(method, _curveball_step(model, x, t, forward_mode="double-backward"))
    if method == "older-double-backward":
        return Contender(method, _older_step(model, x, t))
    if method.startswith("curveball-k"):
        return Contender(
            method, _curveball_step(model, x, t, step_size_interval=step_size_interval)
        )
    if method == "curveball-compiled":
        compiled = torch.compile(model)
        step = _curveball_step(compiled, x, t)
        step()  # compile now (untimed); failures surface here
        return Contender(method, step)
    if method in ("ideal", "ideal-lean"):
        return Contender(method, _ideal_step(model, x, t, seed, lean=method == "ideal-lean"))
    if method == "authors":
        return Contender(method, _authors_step(model, x, t, authors))
    raise ValueError(f"unknown method {method!r}")


def load_authors(path: Path):
    """The authors' ``CurveBall`` class from their ``curveball.py`` at ``path`` (a file, or
    the folder of a checkout that holds it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "curveball.py"
    if not path.is_file():
        raise SystemExit(f"--authors: no curveball.py at {path}")
    spec = importlib.util.spec_from_file_location("authors_curveball", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CurveBall


def _authors_step(model: nn.Module, x, t, authors) -> Callable[[], object]:
    opt = authors(model.parameters(), lr=-1, momentum=-1, lambd=1.0)

    def step() -> object:
        with warnings.catch_warnings():  # its deprecated add_(Number, Tensor) calls
            warnings.simplefilter("ignore", UserWarning)
            return opt.step(lambda: model(x), lambda out: F.cross_entropy(out, t))

    return step


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def time_interleaved(
    contenders: list[Contender], device: torch.device, warmup: int, repeats: int
) -> None:
    n = len(contenders)
    for _ in range(warmup):
        for c in contenders:
            c.step()
    common.sync(device)
    gc.collect()
    for rep in range(repeats):
        # Round-robin, starting one contender later every repetition.
        for i in range(n):
            c = contenders[(rep + i) % n]
            common.sync(device)
            start = time.perf_counter()
            c.step()
            common.sync(device)
            c.times.append(time.perf_counter() - start)


def measure_peak_memory(
    method: str,
    work: Workload,
    device: torch.device,
    seed: int,
    step_size_interval: int,
    authors=None,
) -> int | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    contender = make_contender(method, work, device, seed, step_size_interval, authors)
    contender.step()
    common.sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(MEMORY_STEPS):
        contender.step()
    common.sync(device)
    peak = int(torch.cuda.max_memory_allocated(device))
    del contender
    return peak


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(args: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Median wall time of one optimization step (interleaved timing).",
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available"
    )
    p.add_argument("--models", nargs="+", choices=MODEL_CHOICES, default=["mlp", "cnn", "resnet18"])
    p.add_argument("--methods", nargs="+", choices=BASE_METHODS, default=list(BASE_METHODS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--resnet-batch-size",
        type=int,
        default=None,
        help="batch size for resnet18 (default: 16 on cpu, --batch-size on cuda)",
    )
    p.add_argument("--repeats", type=int, default=20, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first")
    p.add_argument(
        "--step-size-interval",
        type=int,
        default=None,
        metavar="K",
        help="add a contender curveball-kK with step_size_interval=K",
    )
    p.add_argument(
        "--compile", action="store_true", help="add curveball on a torch.compile'd model"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--authors",
        type=Path,
        default=None,
        metavar="PATH",
        help="add the authors' implementation from a local copy of its curveball.py",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    p.add_argument("--markdown", type=Path, default=None, metavar="PATH", help="the tables")
    ns = p.parse_args(args)
    if ns.repeats < 1 or ns.warmup < 0 or ns.batch_size < 1:
        p.error("--repeats must be >= 1, --warmup >= 0 and --batch-size >= 1")
    if ns.step_size_interval is not None and ns.step_size_interval < 1:
        p.error("--step-size-interval must be >= 1")
    return ns


def _ratio(value: float | None, ref: float | None) -> float | None:
    return value / ref if value is not None and ref else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: dict) -> str:
    lines = [
        "| model | batch | method | median (ms) | x sgd | x ideal | x ideal-lean "
        "| peak mem (MiB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        mem = r["peak_mem_bytes"]
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['method']} | {r['median_s'] * 1e3:.2f} | "
            f"{_fmt(r['ratio_sgd'], '.2f')} | {_fmt(r['ratio_ideal'], '.2f')} | "
            f"{_fmt(r['ratio_ideal_lean'], '.2f')} | "
            f"{_fmt(None if mem is None else mem / 2**20, '.1f')} |"
        )
    return "\n".join(lines)


def format_targets(result: dict) -> str:
    """The ratios the project's targets are stated in, per model."""
    medians: dict[str, dict[str, float]] = {}
    for r in result["rows"]:
        medians.setdefault(r["model"], {})[r["method"]] = r["median_s"]
    lines = [
        "| model | curveball / ideal | curveball / sgd | double-backward / curveball "
        "| older-double-backward / curveball | curveball / authors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for model, m in medians.items():
        cb = m.get("curveball")

        def ratio(a: float | None, b: float | None) -> str:
            return _fmt(_ratio(a, b), ".2f")

        lines.append(
            f"| {model} | {ratio(cb, m.get('ideal'))} | {ratio(cb, m.get('sgd'))} | "
            f"{ratio(m.get('curveball-double-backward'), cb)} | "
            f"{ratio(m.get('older-double-backward'), cb)} | {ratio(cb, m.get('authors'))} |"
        )
    return "\n".join(lines)


def run(args: list[str] | None = None) -> dict:
    ns = parse_args(args)
    device_name = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    device = torch.device(device_name)

    methods = list(dict.fromkeys(ns.methods))
    if ns.step_size_interval is not None:
        methods.append(f"curveball-k{ns.step_size_interval}")
    if ns.compile:
        methods.append("curveball-compiled")
    authors = load_authors(ns.authors) if ns.authors is not None else None
    if authors is not None:
        methods.append("authors")

    resnet_bs = ns.resnet_batch_size
    if resnet_bs is None:
        resnet_bs = 16 if device.type == "cpu" else ns.batch_size

    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"repeats={ns.repeats} warmup={ns.warmup}",
        flush=True,
    )

    rows = []
    for model_name in ns.models:
        bs = resnet_bs if model_name == "resnet18" else ns.batch_size
        work = make_workload(model_name, bs, device, ns.seed)
        n_params = sum(p.numel() for p in work.model.parameters())
        print(f"[{model_name}] batch_size={bs} parameters={n_params}", flush=True)

        contenders = []
        kept_methods = []
        for method in methods:
            try:
                contenders.append(
                    make_contender(
                        method, work, device, ns.seed, ns.step_size_interval or 1, authors
                    )
                )
            except Exception as exc:
                if method != "curveball-compiled":
                    raise
                reason = (str(exc).strip().splitlines() or [""])[0]
                print(
                    f"[{model_name}] dropping {method}: compilation failed: "
                    f"{type(exc).__name__}: {reason}",
                    flush=True,
                )
                continue
            kept_methods.append(method)

        time_interleaved(contenders, device, ns.warmup, ns.repeats)
        medians = {c.method: statistics.median(c.times) for c in contenders}
        del contenders

        peaks = {
            m: measure_peak_memory(m, work, device, ns.seed, ns.step_size_interval or 1, authors)
            for m in kept_methods
        }

        for m in kept_methods:
            med = medians[m]
            rows.append(
                {
                    "model": model_name,
                    "method": m,
                    "median_s": med,
                    "peak_mem_bytes": peaks[m],
                    "batch_size": bs,
                    "ratio_sgd": _ratio(med, medians.get("sgd")),
                    "ratio_ideal": _ratio(med, medians.get("ideal")),
                    "ratio_ideal_lean": _ratio(med, medians.get("ideal-lean")),
                }
            )
        del work
        gc.collect()

    result = {
        "device": str(device),
        "batch_size": ns.batch_size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    print()
    print(format_table(result), flush=True)
    print()
    print(format_targets(result), flush=True)
    common.write_markdown(ns.markdown, format_table(result) + "\n\n" + format_targets(result))

    if ns.json is not None:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {ns.json}")
    return result


if __name__ == "__main__":
    run(sys.argv[1:])
