"""The wall-clock race: how fast each optimizer reaches the best tuned Adam's training loss.

Every contender trains the same task from the same initial weights on the same
batch order, in lockstep: one step of each contender per round (the order
rotating), with only the steps timed, so machine noise hits all alike. Every
``--eval-every`` steps the loss over the whole training set is measured
(untimed, evaluation mode). Per task the race reports

* the target: the best final training loss of Adam and AdamW (each at the best
  learning rate of its grid, chosen by a short pre-run that is reported);
* for every contender: the steps and seconds it needs to reach the target, its
  seconds relative to the best Adam's, the loss it has reached when the best Adam
  has used up all its time, and its median step time relative to SGD's;
* for every CurveBall contender: its skipped or rejected steps, by reason;

and plots loss against wall-clock and against steps, one line per contender.

Tasks: the paper's MNIST MLP (784-128-64-32-10, tanh), the 784-512-512-10 ReLU MLP,
the paper's basic CNN with and without batch norm (MNIST 8,000/2,000 split of the
official test files under ``--data-dir``), and a small causal transformer and an
LSTM character-level language model on the Python standard library's source
(read at run time). Contenders: CurveBall at its defaults, ``curveball-paper``
with ``curveball.PAPER_DEFAULTS`` (the authors' method: no preconditioner, λ
starting at 1, the paper's damping rule), ``curveball-paper-damping`` with the
defaults but the paper's damping rule (λ × 0.999 or ÷ 0.999 per step, no floor),
``curveball-no-floor`` with the defaults but no floor under λ (``lambda_min=0``),
``curveball-lazy`` solving for ρ and β on every 5th step only,
``curveball-minibatch`` computing the second forward-mode pass on a quarter of
the batch (``curvature_fraction=0.25``), and ``curveball-tuned`` with its
initial λ chosen from a grid by the same pre-run as the first-order learning
rates (every CurveBall uses the closed-form ``curveball.losses.cross_entropy``);
SGD with momentum 0.9, Adam and AdamW at their best learning rate; HeavyBall's
SOAP and PSGD-Kron, pytorch-optimizer's SophiaH, AdaHessian and Shampoo at their
documented defaults.

Example::

    python -m benchmarks.race --budget 400 --json out/race.json --plots out/race
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sysconfig
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common
from curveball import PAPER_DEFAULTS, CurveBall, losses

LR_GRIDS = {
    "curveball-tuned": (0.3, 0.1, 0.03, 0.01),  # the initial damping λ, not a learning rate
    "sgd": (0.01, 0.03, 0.1, 0.3),
    "adam": (3e-4, 1e-3, 3e-3, 1e-2),
    "adamw": (3e-4, 1e-3, 3e-3, 1e-2),
}
SEQ, VOCAB = 64, 128


# ------------------------------------------------------------------------------------ tasks
class Padded(nn.Module):
    """Zero-pads 28x28 images to 32x32 for the CIFAR-sized basic CNN."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(F.pad(x, (2, 2, 2, 2)))


class CharTransformer(nn.Module):
    def __init__(self, width: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(0.02 * torch.randn(SEQ, width))
        layer = nn.TransformerEncoderLayer(
            width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens):
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        h = self.embedding(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.encoder(h, mask=causal, is_causal=True)).flatten(0, 1)


@dataclass
class Task:
    name: str
    build: Callable[[], nn.Module]
    data: str  # "mnist" or "text"
    batch_size: int = 128


TASKS = {
    t.name: t
    for t in (
        Task("mnist-mlp", lambda: common.mlp((784, 128, 64, 32, 10), nn.Tanh), "mnist"),
        Task("mnist-mlp-512", lambda: common.mlp(), "mnist"),
        Task("mnist-cnn", lambda: Padded(common.basic_cnn(in_channels=1)), "mnist"),
        Task("mnist-cnn-bn", lambda: Padded(common.basic_cnn(True, in_channels=1)), "mnist"),
        Task("char-transformer", CharTransformer, "text", 32),
        Task("char-lstm", lambda: common.CharLSTM(VOCAB), "text", 32),
    )
}


def stdlib_text(chars: int) -> str:
    """The first ``chars`` characters of the standard library's sources, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    return "".join(parts)[:chars]


def text_windows(chars: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of ``SEQ + 1`` characters (ASCII; others map to 127)."""
    codes = torch.tensor([min(ord(c), VOCAB - 1) for c in stdlib_text(chars)])
    windows = codes[: len(codes) // (SEQ + 1) * (SEQ + 1)].view(-1, SEQ + 1)
    return windows[:, :-1].contiguous(), windows[:, 1:].reshape(len(windows), -1)


def load_data(task: Task, data_dir: str, text_chars: int) -> tuple[torch.Tensor, torch.Tensor]:
    if task.data == "mnist":
        split = common.mnist_8k_2k(data_dir)
        return split["x_train"], split["y_train"]
    return text_windows(text_chars)


# ------------------------------------------------------------------------------ contenders
@dataclass
class Contender:
    name: str
    model: nn.Module
    step: Callable[[torch.Tensor, torch.Tensor], None]
    lr: float | None = None
    times: list[float] = field(default_factory=list)
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # step, seconds, loss
    error: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # CurveBall's skipped steps by reason


def _targets(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def gradient_step(opt: torch.optim.Optimizer, model: nn.Module, create_graph: bool = False):
    def step(x: torch.Tensor, t: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), _targets(t)).backward(create_graph=create_graph)
        opt.step()

    return step


def curveball_step(opt: CurveBall, model: nn.Module, closed_form: bool = True):
    """A CurveBall step on cross-entropy: ``curveball.losses``' closed form, or (with
    ``closed_form=False``) the plain function, whose derivatives come from autograd."""

    def step(x: torch.Tensor, t: torch.Tensor) -> None:
        if closed_form:
            loss_fn = losses.cross_entropy(_targets(t))
        else:
            loss_fn = lambda y: F.cross_entropy(y, _targets(t))  # noqa: E731
        opt.step(lambda: model(x), loss_fn)

    step.optimizer = opt  # type: ignore[attr-defined]  # the race counts its skipped steps
    return step


def _peers() -> dict[str, Callable[[nn.Module], Callable]]:
    peers: dict[str, Callable[[nn.Module], Callable]] = {}
    try:
        import heavyball

        heavyball.utils.compile_mode = None  # no torch.compile on this CPU
        peers["soap"] = lambda m: gradient_step(heavyball.SOAP(m.parameters()), m)
        peers["psgd-kron"] = lambda m: gradient_step(heavyball.PSGDKron(m.parameters()), m)
    except ImportError:
        pass
    try:
        import pytorch_optimizer as po

        peers["sophiah"] = lambda m: gradient_step(po.SophiaH(m.parameters()), m, True)
        peers["adahessian"] = lambda m: gradient_step(po.AdaHessian(m.parameters()), m, True)
        peers["shampoo"] = lambda m: gradient_step(po.Shampoo(m.parameters()), m)
    except ImportError:
        pass
    return peers


def make_step(name: str, model: nn.Module, lr: float | None):
    if name in CURVEBALL_OPTIONS:
        return curveball_step(CurveBall(model, **CURVEBALL_OPTIONS[name]), model)
    if name == "curveball-tuned":
        return curveball_step(CurveBall(model, lambd=lr), model)
    if name == "sgd":
        return gradient_step(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), model)
    if name == "adam":
        return gradient_step(torch.optim.Adam(model.parameters(), lr=lr), model)
    if name == "adamw":
        return gradient_step(torch.optim.AdamW(model.parameters(), lr=lr), model)
    return _peers()[name](model)


PAPER_DAMPING = {k: PAPER_DEFAULTS[k] for k in ("lambda_factor", "lambda_thresholds", "lambda_min")}
"""The paper's damping rule: every 5 steps, λ × 0.999⁵ when the trust ratio exceeds 1.5 and
λ / 0.999⁵ when it is below 0.5, with no floor (the defaults: × 2/3 above 3/4, × 3/2 below
1/4, not below 0.05)."""

CURVEBALL_OPTIONS = {
    "curveball": {},
    "curveball-paper": PAPER_DEFAULTS,
    "curveball-paper-damping": PAPER_DAMPING,
    "curveball-no-floor": {"lambda_min": 0.0},
    "curveball-lazy": {"step_size_interval": 5},
    "curveball-minibatch": {"curvature_fraction": 0.25},
}
"""CurveBall contenders by their constructor keywords. ``curveball-lazy`` solves for ρ and β
only on the trust-region test steps (every 5th), skipping the second forward-mode pass on
the others; ``curveball-minibatch`` estimates the curvature terms of the 2×2 system on the
first quarter of the batch; ``curveball-tuned`` (not here) picks its initial λ from
``LR_GRIDS`` like the first-order optimizers pick their learning rate."""

CONTENDERS = ("curveball", "curveball-paper", "curveball-paper-damping", "curveball-no-floor",
              "curveball-lazy", "curveball-minibatch", "curveball-tuned", "sgd", "adam",
              "adamw", "soap", "psgd-kron", "sophiah", "adahessian", "shampoo")  # fmt: skip


# ------------------------------------------------------------------------------ the race
@torch.no_grad()
def training_loss(model: nn.Module, x: torch.Tensor, t: torch.Tensor, chunk: int = 1000) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(x), chunk):
        logits = model(x[start : start + chunk])
        total += float(F.cross_entropy(logits, _targets(t[start : start + chunk]), reduction="sum"))
    model.train(was_training)
    return total / _targets(t).numel()


def batches(n: int, batch_size: int, steps: int, seed: int):
    """The same batch order for every contender: epochs of seeded permutations."""
    out, epoch = [], 0
    while len(out) < steps:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        out += [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
        epoch += 1
    return out[:steps]


def pick_lr(name: str, task: Task, init: nn.Module, x, t, order, pre_steps: int):
    """The learning rate of the grid with the lowest training loss after ``pre_steps``."""
    scores = {}
    for lr in LR_GRIDS[name]:
        model = copy.deepcopy(init)
        step = make_step(name, model, lr)
        for idx in order[:pre_steps]:
            step(x[idx], t[idx])
        loss = training_loss(model, x, t)
        scores[lr] = loss if math.isfinite(loss) else math.inf
    return min(scores, key=scores.get), scores


def lockstep_round(contenders: list[Contender], xb: torch.Tensor, tb: torch.Tensor) -> None:
    """One timed step of every contender, on the same batch."""
    for c in contenders:
        if c.error is not None:
            continue
        start = time.perf_counter()
        try:
            c.step(xb, tb)
        except Exception as error:  # a peer that cannot run here is listed with the reason
            c.error = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            continue
        c.times.append(time.perf_counter() - start)
        last = getattr(getattr(c.step, "optimizer", None), "last", None)
        if last is not None and last.skipped:
            c.skipped[last.reason] = c.skipped.get(last.reason, 0) + 1


def race_task(task: Task, args, x, t) -> dict:
    torch.manual_seed(args.seed)
    init = task.build()
    order = batches(len(x), task.batch_size, args.budget, args.seed)
    grids = {}
    contenders = []
    for name in args.contenders:
        lr = None
        if name in LR_GRIDS:
            lr, scores = pick_lr(name, task, init, x, t, order, args.pre_steps)
            grids[name] = {"chosen": lr, "pre_run_loss": scores}
        model = copy.deepcopy(init)
        try:
            contenders.append(Contender(name, model, make_step(name, model, lr), lr))
        except KeyError:
            contenders.append(Contender(name, model, lambda x, t: None, error="not installed"))
    first = training_loss(init, x, t)
    for c in contenders:
        c.curve.append((0, 0.0, first))
    for step_index, idx in enumerate(order, start=1):
        shift = step_index % len(contenders)
        lockstep_round(contenders[shift:] + contenders[:shift], x[idx], t[idx])
        if step_index % args.eval_every == 0 or step_index == len(order):
            for c in contenders:
                if c.error is None:
                    loss = training_loss(c.model, x, t)
                    c.curve.append((step_index, sum(c.times), loss))
        if args.verbose and step_index % max(1, len(order) // 10) == 0:
            print(f"  {task.name}: step {step_index}/{len(order)}", flush=True)
    return summarise(task, contenders, grids)


def _first_reach(curve, target: float) -> tuple[int | None, float | None]:
    for step, seconds, loss in curve:
        if loss <= target:
            return step, seconds
    return None, None


def _loss_at(curve, seconds: float) -> float:
    """The loss a contender had reached after ``seconds`` of its own stepping time."""
    reached = [loss for _, s, loss in curve if s <= seconds]
    return reached[-1] if reached else curve[0][2]


def summarise(task: Task, contenders: list[Contender], grids: dict) -> dict:
    ran = {c.name: c for c in contenders if c.error is None}
    adams = [ran[n] for n in ("adam", "adamw") if n in ran]
    best_adam = min(adams, key=lambda c: c.curve[-1][2])
    target = best_adam.curve[-1][2]
    adam_steps, adam_seconds = _first_reach(best_adam.curve, target)
    adam_total = best_adam.curve[-1][1]
    sgd = ran.get("sgd")
    sgd_ms = statistics.median(sgd.times) * 1e3 if sgd is not None and sgd.times else None
    rows = []
    for c in contenders:
        row = {"contender": c.name, "lr": c.lr, "error": c.error}
        if c.error is None:
            steps, seconds = _first_reach(c.curve, target)
            step_ms = statistics.median(c.times) * 1e3
            row.update(
                steps_to_target=steps,
                seconds_to_target=seconds,
                time_ratio_to_adam=None if seconds is None else seconds / adam_seconds,
                step_ratio_to_adam=None if steps is None else steps / adam_steps,
                loss_at_adam_time=_loss_at(c.curve, adam_total),
                final_loss=c.curve[-1][2],
                step_ms=step_ms,
                step_ratio_to_sgd=None if sgd_ms is None else step_ms / sgd_ms,
                skipped_steps=c.skipped if hasattr(c.step, "optimizer") else None,
                curve=c.curve,
            )
        rows.append(row)
    return {
        "task": task.name,
        "target": target,
        "best_adam": best_adam.name,
        "adam_seconds": adam_seconds,
        "adam_total_seconds": adam_total,
        "lr_grids": grids,
        "rows": rows,
    }


# ------------------------------------------------------------------------------ reporting
def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(results: list[dict]) -> str:
    lines = [
        "| task | contender | lr | steps to target | seconds to target | × best Adam (time) "
        "| × best Adam (steps) | loss at Adam's time | step ms | × SGD step |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        for row in r["rows"]:
            if row["error"] is not None:
                lines.append(f"| {r['task']} | {row['contender']} | | {row['error']} | | | | | | |")
                continue
            lines.append(
                f"| {r['task']} | {row['contender']} | {_fmt(row['lr'], 'g')} "
                f"| {_fmt(row['steps_to_target'], 'd')} | {_fmt(row['seconds_to_target'], '.2f')} "
                f"| {_fmt(row['time_ratio_to_adam'], '.2f')} "
                f"| {_fmt(row['step_ratio_to_adam'], '.2f')} "
                f"| {row['loss_at_adam_time']:.4f} | {row['step_ms']:.1f} "
                f"| {_fmt(row['step_ratio_to_sgd'], '.2f')} |"
            )
    targets = "; ".join(f"{r['task']}: {r['target']:.4f} ({r['best_adam']})" for r in results)
    skipped = [
        f"{r['task']} {row['contender']}: " + ", ".join(f"{n} × {k}" for k, n in counts.items())
        for r in results
        for row in r["rows"]
        if (counts := row.get("skipped_steps"))
    ]
    return (
        "\n".join(lines)
        + f"\n\nTargets (best tuned Adam/AdamW final training loss): {targets}"
        + f"\n\nSkipped or rejected CurveBall steps: {'; '.join(skipped) or 'none'}"
    )


def plot(results: list[dict], folder: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(folder).mkdir(parents=True, exist_ok=True)
    for r in results:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for row in r["rows"]:
            if row["error"] is not None:
                continue
            steps, seconds, losses = zip(*row["curve"], strict=True)
            style = {"lw": 2.0} if row["contender"].startswith("curveball") else {"lw": 1.0}
            axes[0].plot(seconds, losses, label=row["contender"], **style)
            axes[1].plot(steps, losses, label=row["contender"], **style)
        for ax, xlabel in zip(axes, ("stepping time (s)", "steps"), strict=True):
            ax.axhline(r["target"], color="k", ls=":", lw=0.8)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("training loss (whole training set)")
            ax.grid(True, which="both", alpha=0.3)
        finals = [row["final_loss"] for row in r["rows"] if row["error"] is None]
        first = r["rows"][0]["curve"][0][2] if r["rows"][0]["error"] is None else max(finals)
        for ax in axes:
            ax.set_ylim(min(finals) / 1.5, first * 1.5)
        axes[1].legend(fontsize=7)
        fig.suptitle(f"{r['task']} (dotted: the best tuned Adam's final loss)")
        fig.tight_layout()
        fig.savefig(Path(folder) / f"{r['task']}.png", dpi=80)
        plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--budget", type=int, default=400, help="steps per contender")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="samples per step on every task (default: each task's own, 128 images or 32 "
        "text windows)",
    )
    p.add_argument("--pre-steps", type=int, default=None, help="learning-rate pre-run steps")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--data-dir", default=os.environ.get("CURVEBALL_DATA", "../shared/data"))
    p.add_argument("--text-chars", type=int, default=300_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--plots", default=None)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.pre_steps is None:
        args.pre_steps = max(1, args.budget // 4)
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size: expected a positive integer, got {args.batch_size}")
    if not {"adam", "adamw"} & set(args.contenders):
        p.error("--contenders must include adam or adamw (the target)")
    return args


def run(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.tasks:
            task = TASKS[name]
            if args.batch_size is not None:
                task = replace(task, batch_size=args.batch_size)
            x, t = load_data(task, args.data_dir, args.text_chars)
            results.append(race_task(task, args, x, t))
            print(markdown([results[-1]]).split("\n\nTargets")[0], flush=True)
    print(markdown(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=1)
    if args.plots:
        plot(results, args.plots)
    return results


if __name__ == "__main__":
    run()
