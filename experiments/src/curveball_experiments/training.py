"""The training loop of the classification experiments.

For a given seed every optimizer starts from the same initial weights
(``torch.manual_seed(seed)`` before the model is built) and sees the same
mini-batches in the same order. After every epoch the loop measures the
cross-entropy over the whole training split and the accuracy on the validation
split (model in evaluation mode, outside the timed region) and the training
wall-clock so far. CurveBall runs at its defaults; SGD (momentum 0.9, lr 0.01)
and Adam (lr 1e-3) at common defaults, untuned.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curveball_experiments import optimizers
from curveball_experiments.datasets import Dataset

OPTIMIZERS: dict[str, Callable[[nn.Module], optimizers.Stepper]] = {
    "CurveBall": lambda m: optimizers.curveball(m),
    "SGD": lambda m: optimizers.sgd(m.parameters()),
    "Adam": lambda m: optimizers.adam(m.parameters()),
}
"""Optimizers compared on the networks, all at default settings."""

SMOOTHING = 10
"""Mini-batch losses are averaged over this many iterations in the plots."""


@dataclass
class TrainSettings:
    """How long and on what to train."""

    epochs: int
    batch_size: int = 128
    eval_batch_size: int = 512
    optimizers: Sequence[str] = ("CurveBall", "SGD", "Adam")


@dataclass
class RunLog:
    """One training run."""

    batch_loss: list[float] = field(default_factory=list)
    batch_seconds: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # per epoch, epoch 0 = start
    val_accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    diverged: bool = False
    final_lambda: float | None = None  # CurveBall's damping after the last step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, device: torch.device, batch_size: int
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``(x, y)``, in evaluation mode."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        logits = model(xb)
        total_loss += F.cross_entropy(logits, yb, reduction="sum").double()
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    n = max(len(x), 1)
    return float(total_loss) / n, float(correct) / n


def train(
    build: Callable[[], nn.Module],
    dataset: Dataset,
    optimizer: str | Callable[[nn.Module], optimizers.Stepper],
    seed: int,
    settings: TrainSettings,
    device: torch.device,
    bar: Any = None,
) -> RunLog:
    """Train one freshly built model with one optimizer; see the module docstring."""
    torch.manual_seed(seed)
    model = build().to(device)
    model.train()
    make_stepper = OPTIMIZERS[optimizer] if isinstance(optimizer, str) else optimizer
    stepper = make_stepper(model)
    log = RunLog()
    loss0, _ = evaluate(model, dataset.x_train, dataset.y_train, device, settings.eval_batch_size)
    _, acc0 = evaluate(model, dataset.x_val, dataset.y_val, device, settings.eval_batch_size)
    log.train_loss.append(loss0)
    log.val_accuracy.append(acc0)
    log.seconds.append(0.0)
    elapsed = 0.0
    for epoch in range(settings.epochs):
        g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + epoch)
        order = torch.randperm(len(dataset.x_train), generator=g)
        losses = []
        for start in range(0, len(order), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            xb = dataset.x_train[idx].to(device)
            yb = dataset.y_train[idx].to(device)
            _sync(device)
            begin = time.perf_counter()
            loss = stepper.step(
                lambda xb=xb: model(xb), lambda out, yb=yb: F.cross_entropy(out, yb)
            )
            _sync(device)
            elapsed += time.perf_counter() - begin
            losses.append(loss)
            log.batch_seconds.append(elapsed)
            if bar is not None:
                bar.update(1)
        log.batch_loss += torch.stack(losses).double().cpu().tolist()
        train_loss, _ = evaluate(
            model, dataset.x_train, dataset.y_train, device, settings.eval_batch_size
        )
        _, accuracy = evaluate(
            model, dataset.x_val, dataset.y_val, device, settings.eval_batch_size
        )
        log.train_loss.append(train_loss)
        log.val_accuracy.append(accuracy)
        log.seconds.append(elapsed)
        if not math.isfinite(train_loss):
            log.diverged = True
            missing = settings.epochs - epoch - 1
            log.train_loss += [math.nan] * missing
            log.val_accuracy += [math.nan] * missing
            log.seconds += [elapsed] * missing
            break
    last = getattr(getattr(stepper, "optimizer", None), "last", None)
    if last is not None and hasattr(last, "next_lambd"):
        log.final_lambda = float(last.next_lambd)
    return log


def running_mean(values: Sequence[float], window: int = SMOOTHING) -> list[float]:
    """Mean of the last ``window`` values at every position (fewer at the start)."""
    out, total, queue = [], 0.0, []
    for v in values:
        queue.append(v)
        total += v
        if len(queue) > window:
            total -= queue.pop(0)
        out.append(total / len(queue))
    return out
