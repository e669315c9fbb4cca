"""Image classification experiments: MNIST, CIFAR-10, ImageNet and random architectures.

One training loop serves them all. For a given seed every optimizer starts from the
same initial weights (``torch.manual_seed(seed)`` before the model is built) and
sees the same mini-batches in the same order. After every epoch the loop measures
the cross-entropy over the whole training split and the accuracy on the validation
split (model in evaluation mode, outside the timed region) and the training
wall-clock so far. CurveBall runs at its defaults; SGD (momentum 0.9, lr 0.01) and
Adam (lr 1e-3) at common defaults, untuned.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curveball.experiments import baselines
from curveball.experiments.report import Report, progress

OPTIMIZERS: dict[str, Callable[[nn.Module], baselines.Stepper]] = {
    "CurveBall": lambda m: baselines.curveball(m),
    "SGD": lambda m: baselines.sgd(m.parameters()),
    "Adam": lambda m: baselines.adam(m.parameters()),
}
"""Optimizers compared on the networks, all at default settings."""

SMOOTHING = 10
"""Mini-batch losses are averaged over this many iterations in the plots."""


# --------------------------------------------------------------------------- data
def _has_mnist(folder: Path) -> bool:
    for sub in (folder, folder / "raw", folder / "MNIST" / "raw"):
        for prefix in ("t10k", "train"):
            if any((sub / f"{prefix}-images-idx3-ubyte{gz}").is_file() for gz in ("", ".gz")):
                return True
    return False


def find_mnist(data_dir: Path | str | None) -> Path | None:
    """The folder holding the MNIST IDX files: ``data_dir`` itself or its ``mnist/``."""
    if data_dir is None:
        return None
    root = Path(data_dir)
    for folder in (root, root / "mnist", root / "MNIST"):
        if _has_mnist(folder):
            return folder
    return None


def find_cifar10(data_dir: Path | str | None) -> Path | None:
    """The ``cifar-10-batches-py`` folder under ``data_dir`` (or ``data_dir/cifar10``)."""
    if data_dir is None:
        return None
    root = Path(data_dir)
    candidates = [root, root / "cifar-10-batches-py", root / "cifar10"]
    candidates.append(root / "cifar10" / "cifar-10-batches-py")
    for folder in candidates:
        if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
            return folder
    return None


def find_imagenet(data_dir: Path | str | None) -> Path | None:
    """An ImageNet-style folder (``train/<class>/<images>``) under ``data_dir``."""
    if data_dir is None:
        return None
    root = Path(data_dir)
    for folder in (root / "imagenet", root / "ILSVRC2012", root):
        train = folder / "train"
        if train.is_dir() and any(p.is_dir() for p in train.iterdir()):
            return folder
    return None


@dataclass
class Dataset:
    """In-memory training and validation tensors of one task."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    num_classes: int
    note: str = ""

    def subset(self, train: int | None, val: int | None) -> Dataset:
        """The first ``train`` / ``val`` examples (``None``: all)."""
        return Dataset(
            self.name,
            self.x_train[:train],
            self.y_train[:train],
            self.x_val[:val],
            self.y_val[:val],
            self.num_classes,
            self.note,
        )

    def describe(self) -> str:
        shape = "x".join(str(s) for s in self.x_train.shape[1:])
        return (
            f"{self.name}: {len(self.x_train)} training and {len(self.x_val)} validation "
            f"images of {shape}, {self.num_classes} classes"
        )


def load_mnist_dataset(folder: Path) -> Dataset:
    """MNIST via ``data.mnist_splits``.

    With only the official test files, their first 8,000 images train and the last
    2,000 validate; a smaller test file (a test fixture) is split 80/20 instead.
    """
    from curveball.experiments import data

    try:
        splits = data.mnist_splits(folder)
    except ValueError:
        n = len(data.load_mnist(folder, "test")[1])
        train = (4 * n) // 5
        splits = data.mnist_splits(folder, train_size=train, val_size=n - train)
    return Dataset(
        "MNIST",
        splits["x_train"],
        splits["y_train"],
        splits["x_val"],
        splits["y_val"],
        10,
        splits["note"],
    )


def load_cifar10_dataset(folder: Path) -> Dataset:
    """CIFAR-10: training batches for training, ``test_batch`` for validation."""
    from curveball.experiments import data

    d = data.load_cifar10(folder)
    note = f"CIFAR-10 from {folder}: data_batch_1..5 for training, test_batch for validation."
    return Dataset("CIFAR-10", d["x_train"], d["y_train"], d["x_test"], d["y_test"], 10, note)


def load_imagenet_dataset(
    folder: Path, image_size: int, classes: int | None, max_per_class: int | None
) -> Dataset:
    """An ImageNet-style folder; ``val/`` for validation when it exists, else 10% of
    every class of ``train/``. Inputs are standardised with the training mean/std."""
    from curveball.experiments import data

    x, y, names = data.load_image_folder(
        folder, image_size, classes, split="train", max_per_class=max_per_class
    )
    if (folder / "val").is_dir():
        xv, yv, _ = data.load_image_folder(
            folder, image_size, classes, split="val", max_per_class=max_per_class
        )
        how = "train/ for training, val/ for validation"
    else:
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(y), generator=g)
        cut = max(1, len(y) // 10)
        xv, yv, x, y = x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]
        how = "no val/ folder: a fixed random 10% of train/ for validation"
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    note = (
        f"ImageNet-style folder {folder}: {len(names)} classes, images centre-cropped and "
        f"resized to {image_size}x{image_size}; {how}."
    )
    return Dataset("ImageNet", (x - mean) / std, y, (xv - mean) / std, yv, len(names), note)


def synthetic_dataset(seed: int = 0, train: int = 4000, val: int = 1000) -> Dataset:
    """A built-in 10-class task of 1x16x16 images (no download needed).

    Each class has a fixed random smooth template (Gaussian noise blurred by a 5x5
    box filter, scaled to unit variance); an example is its class template plus
    i.i.d. ``N(0, 1)`` pixel noise.
    """
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(10, 1, 20, 20, generator=g)
    templates = F.avg_pool2d(raw, 5, stride=1)
    templates = (templates - templates.mean()) / templates.std()

    def sample(count: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, 10, (count,), generator=g)
        x = templates[y] + torch.randn(count, 1, 16, 16, generator=g)
        return x, y

    x_train, y_train = sample(train)
    x_val, y_val = sample(val)
    note = (
        "Synthetic task (no MNIST given): 10 classes of 1x16x16 images, class template "
        f"(blurred Gaussian noise) plus N(0, 1) pixel noise; {train} training and {val} "
        "validation examples."
    )
    return Dataset("synthetic", x_train, y_train, x_val, y_val, 10, note)


# ----------------------------------------------------------------------- training
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
    optimizer: str | Callable[[nn.Module], baselines.Stepper],
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


def add_training_runs(
    report: Report, problem: str, optimizer: str, logs: Sequence[RunLog], epochs: int
) -> None:
    """Rows (one value per seed) and curves of a set of training runs."""
    for e in range(1, epochs + 1):
        report.add_row(problem, optimizer, f"train loss @{e}", [lg.train_loss[e] for lg in logs])
    for e in range(1, epochs + 1):
        report.add_row(problem, optimizer, f"val acc @{e}", [lg.val_accuracy[e] for lg in logs])
        report.add_row(problem, optimizer, f"seconds @{e}", [lg.seconds[e] for lg in logs])
        if e < epochs:
            report.hidden_metrics.update({f"val acc @{e}", f"seconds @{e}"})
    for lg in logs:
        report.add_curve(
            problem,
            optimizer,
            running_mean(lg.batch_loss),
            lg.batch_seconds,
            range(1, 1 + len(lg.batch_loss)),
        )


def compare_epochs(report: Report, problem: str, epochs: int, claim_suffix: str = "") -> None:
    """Check: CurveBall's training loss below SGD's and Adam's after every epoch."""
    bad = []
    for e in range(1, epochs + 1):
        metric = f"train loss @{e}"
        cb = report.median(problem, "CurveBall", metric)
        for other in ("SGD", "Adam"):
            o = report.median(problem, other, metric)
            if cb is None or o is None or not cb < o:
                bad.append(f"epoch {e} vs {other}: {cb} >= {o}")
    report.check(
        f"{problem}: CurveBall training loss below SGD's and Adam's after every epoch"
        + claim_suffix,
        not bad,
        "; ".join(bad) if bad else "holds at every epoch (medians over seeds)",
    )


def run_models(
    report: Report,
    dataset: Dataset,
    models: dict[str, Callable[[], nn.Module]],
    seeds: Sequence[int],
    settings: TrainSettings,
    device: torch.device,
) -> None:
    """Train every model with every optimizer on every seed."""
    per_epoch = math.ceil(len(dataset.x_train) / settings.batch_size)
    total = len(models) * len(settings.optimizers) * len(seeds) * settings.epochs * per_epoch
    bar = progress(total, report.experiment)
    for model_name, build in models.items():
        for optimizer in settings.optimizers:
            bar.set_postfix_str(f"{model_name} {optimizer}")
            logs = [train(build, dataset, optimizer, s, settings, device, bar) for s in seeds]
            add_training_runs(report, model_name, optimizer, logs, settings.epochs)
            if optimizer == "CurveBall":
                report.settings.setdefault("curveball_final_lambda", {})[model_name] = [
                    lg.final_lambda for lg in logs
                ]
    bar.close()
    report.curve_label = f"training loss (mini-batch, running mean of {SMOOTHING})"
    report.notes.append(
        "settings.curveball_final_lambda: CurveBall's damping after the last step (it starts "
        "at 1; the trust-region rule changes it by at most a factor 0.999 per step)."
    )


def _describe(
    report: Report,
    dataset: Dataset,
    settings: TrainSettings,
    seeds: Sequence[int],
    per_epoch: bool = True,
) -> None:
    report.settings.update(
        {
            "dataset": dataset.describe(),
            "epochs": settings.epochs,
            "batch_size": settings.batch_size,
            "seeds": list(seeds),
            "optimizers": {
                "CurveBall": "defaults (lr 1, lambda 1, automatic rho and beta)",
                "SGD": f"momentum {baselines.SGD_MOMENTUM}, lr {baselines.DEFAULT_LR['SGD']}",
                "Adam": f"lr {baselines.DEFAULT_LR['Adam']}, betas (0.9, 0.999)",
            },
        }
    )
    if dataset.note:
        report.notes.append(dataset.note)
    report.notes.append(
        dataset.describe() + f"; batch {settings.batch_size}, {settings.epochs} epoch(s)."
    )
    if per_epoch:
        report.notes.append(
            "train loss @e: cross-entropy over the whole training split after epoch e (model "
            "in evaluation mode); val acc @e: validation accuracy; seconds @e: training time "
            "(evaluation excluded). Values are medians (min-max) over seeds."
        )
    report.notes.append(
        "Same initial weights and the same mini-batch order for every optimizer (per seed). "
        "No optimizer is tuned."
    )


def _pad_to_32(x: Tensor) -> Tensor:
    return F.pad(x, (2, 2, 2, 2))


class Padded(nn.Module):
    """Zero-pads 28x28 inputs to 32x32 before the wrapped network."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(_pad_to_32(x))


def _sized(
    dataset: Dataset,
    epochs: int | None,
    quick: bool,
    full_epochs: int,
    quick_sizes: tuple[int, int, int],
) -> tuple[Dataset, TrainSettings]:
    """The dataset and settings of a run: ``quick_sizes`` = (train, val, batch) in quick mode."""
    settings = TrainSettings(epochs=epochs or (1 if quick else full_epochs))
    if quick:
        train_count, val_count, settings.batch_size = quick_sizes
        dataset = dataset.subset(train_count, val_count)
    return dataset, settings


def _compare_networks(
    name: str,
    out_dir: Path | str,
    dataset: Dataset,
    settings: TrainSettings,
    nets: dict[str, Callable[[], nn.Module]],
    compared: Sequence[str],
    seeds: Sequence[int],
    device: torch.device,
    notes: Sequence[str] = (),
) -> Report:
    """Train every network with every optimizer, then check CurveBall on ``compared``."""
    report = Report(name, out_dir, device=str(device))
    _describe(report, dataset, settings, seeds)
    report.notes.extend(notes)
    run_models(report, dataset, nets, seeds, settings, device)
    for problem in compared:
        compare_epochs(report, problem, settings.epochs)
    return report


def run_mnist(
    out_dir: Path | str,
    data_dir: Path | str | None,
    seeds: Sequence[int],
    quick: bool,
    device: torch.device,
    epochs: int | None = None,
) -> Report:
    """MNIST with the paper's MLP, a wider MLP and the basic CNN."""
    from curveball.experiments import models

    folder = find_mnist(data_dir)
    if folder is None:
        raise FileNotFoundError(f"no MNIST IDX files in {data_dir} or {data_dir}/mnist")
    dataset = load_mnist_dataset(folder)
    print(dataset.note)
    dataset, settings = _sized(dataset, epochs, quick, 5, (256, 128, 64))
    nets = {
        "mlp": models.mnist_mlp,
        "mlp 512 relu": lambda: models.mlp(784, (512, 512), 10),
        "basic cnn": lambda: Padded(models.basic_cnn(batch_norm=False, in_channels=1)),
    }
    note = (
        "Models: mlp, the paper's MNIST MLP (784-128-64-32-10, tanh; models.mnist_mlp); "
        "mlp 512 relu, a wider MLP (784-512-512-10, ReLU; the step-time benchmark's mlp), "
        "reported for comparison; basic CNN of the paper (models.basic_cnn, no batch norm, "
        "1 input channel) on images zero-padded to 32x32, since its 4x4 convolution needs a "
        "4x4 map after three poolings."
    )
    return _compare_networks(
        "mnist", out_dir, dataset, settings, nets, ["mlp"], seeds, device, [note]
    )


def run_cifar10(
    out_dir: Path | str,
    data_dir: Path | str | None,
    seeds: Sequence[int],
    quick: bool,
    device: torch.device,
    epochs: int | None = None,
) -> Report:
    """CIFAR-10 with the basic CNN (with and without batch norm) and ResNet-18."""
    from curveball.experiments import models

    folder = find_cifar10(data_dir)
    if folder is None:
        raise FileNotFoundError(f"no CIFAR-10 python batches under {data_dir}")
    dataset, settings = _sized(load_cifar10_dataset(folder), epochs, quick, 10, (64, 32, 32))
    nets = {
        "basic cnn": lambda: models.basic_cnn(batch_norm=False),
        "basic cnn + bn": lambda: models.basic_cnn(batch_norm=True),
        "resnet-18": lambda: models.resnet18(),
    }
    notes = []
    if quick:
        nets["resnet-18"] = lambda: models.ResNet((2, 2, 2, 2), (8, 16, 32, 64))
        notes.append(
            "Quick mode: ResNet-18 with its depth but 1/8 of the widths (8-16-32-64 channels)."
        )
    return _compare_networks(
        "cifar10", out_dir, dataset, settings, nets, list(nets), seeds, device, notes
    )


def run_imagenet(
    out_dir: Path | str,
    data_dir: Path | str | None,
    seeds: Sequence[int],
    quick: bool,
    device: torch.device,
    epochs: int | None = None,
    classes: int | None = None,
    image_size: int | None = None,
) -> Report:
    """VGG-f on an ImageNet-style image folder (optionally the first ``classes``)."""
    from curveball.experiments import models

    folder = find_imagenet(data_dir)
    if folder is None:
        raise FileNotFoundError(f"no ImageNet-style folder (imagenet/train/<class>/) in {data_dir}")
    size = image_size or (64 if quick else 128)
    dataset = load_imagenet_dataset(folder, size, classes, 16 if quick else None)
    dataset, settings = _sized(dataset, epochs, quick, 10, (32, 16, 16))
    n = dataset.num_classes
    nets = {"vgg-f": lambda: models.vggf(num_classes=n)}
    report = _compare_networks(
        "imagenet", out_dir, dataset, settings, nets, ["vgg-f"], seeds, device
    )
    report.settings.update({"image_size": size, "classes": n})
    return report


def run_random_archs(
    out_dir: Path | str,
    data_dir: Path | str | None,
    count: int,
    quick: bool,
    device: torch.device,
    epochs: int | None = None,
) -> Report:
    """Train ``count`` random architectures with every optimizer; count the wins."""
    from curveball.experiments import models

    folder = find_mnist(data_dir)
    if folder is not None:
        dataset = load_mnist_dataset(folder)
        print(dataset.note)
    else:
        dataset = synthetic_dataset()
    settings = TrainSettings(epochs=epochs or 1)
    if quick:
        dataset = dataset.subset(128, 64)
        settings.batch_size = 64
    in_shape = tuple(dataset.x_train.shape[1:])
    report = Report("random-archs", out_dir, device=str(device))
    _describe(report, dataset, settings, range(count), per_epoch=False)
    report.settings["architectures"] = []
    final: dict[str, list[float]] = {o: [] for o in settings.optimizers}
    per_epoch = math.ceil(len(dataset.x_train) / settings.batch_size)
    bar = progress(count * len(settings.optimizers) * settings.epochs * per_epoch, "random-archs")
    for seed in range(count):
        _, description = models.random_architecture(seed, in_shape, dataset.num_classes)
        if quick:
            description["note"] = "quick mode"
        report.settings["architectures"].append(description)

        def build(seed: int = seed) -> nn.Module:
            return models.random_architecture(seed, in_shape, dataset.num_classes)[0]

        for optimizer in settings.optimizers:
            bar.set_postfix_str(f"architecture {seed} {optimizer}")
            log = train(build, dataset, optimizer, seed, settings, device, bar)
            final[optimizer].append(log.train_loss[-1])
            report.add_curve(
                f"{count} random architectures",
                optimizer,
                running_mean(log.batch_loss),
                log.batch_seconds,
                range(1, 1 + len(log.batch_loss)),
            )
    bar.close()
    problem = f"{count} random architectures"
    wins = {o: [0] * count for o in settings.optimizers}
    for i in range(count):
        losses = {o: final[o][i] for o in settings.optimizers}
        finite = {o: v for o, v in losses.items() if math.isfinite(v)}
        if finite:
            wins[min(finite, key=lambda o: finite[o])][i] = 1
    for optimizer in settings.optimizers:
        report.add_row(problem, optimizer, "wins", wins[optimizer])
        report.add_row(problem, optimizer, "final train loss", final[optimizer])
    report.formats["wins"] = lambda v, m: f"{int(sum(v))}/{len(v)}"
    report.metric_labels["wins"] = "lowest final training loss (architectures)"
    report.metric_labels["final train loss"] = "final training loss, median (min–max)"
    report.curve_label = f"training loss (mini-batch, running mean of {SMOOTHING})"
    report.notes.append(
        f"Each architecture (random_architecture(seed) for seed 0..{count - 1}) is trained "
        f"from the same initial weights with every optimizer for {settings.epochs} epoch(s); "
        "'wins' counts the architectures on which an optimizer reaches the lowest final "
        "training loss (over the whole training split). 'values' in results.json are one "
        "per architecture."
    )
    cb_wins = sum(wins["CurveBall"])
    best_other = max(sum(wins[o]) for o in settings.optimizers if o != "CurveBall")
    report.check(
        "random architectures: CurveBall wins on more architectures than any other optimizer",
        cb_wins > best_other,
        ", ".join(f"{o} {sum(w)}" for o, w in wins.items()),
    )
    return report


def default_data_dir(value: str | None) -> str | None:
    """``--data-dir`` or the ``CURVEBALL_DATA`` environment variable."""
    return value or os.environ.get("CURVEBALL_DATA") or None
