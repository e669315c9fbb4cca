"""Image classification experiments: MNIST, CIFAR-10, ImageNet and random architectures.

Each runner builds its dataset (:mod:`~curveball_experiments.datasets`), trains
every network with every optimizer (:mod:`~curveball_experiments.training`) and
writes a :class:`~curveball_experiments.report.Report`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curveball_experiments import models, optimizers
from curveball_experiments.datasets import (
    Dataset,
    find_cifar10,
    find_imagenet,
    find_mnist,
    load_cifar10_dataset,
    load_imagenet_dataset,
    load_mnist_dataset,
    synthetic_dataset,
)
from curveball_experiments.report import Report, progress
from curveball_experiments.training import SMOOTHING, RunLog, TrainSettings, running_mean, train


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
        "settings.curveball_final_lambda: CurveBall's damping after the last step (CurveBall: "
        f"{optimizers.curveball_description()}; every lambda_interval steps the trust-region "
        "rule changes λ by the factor lambda_factor ** lambda_interval or its inverse, not "
        "below lambda_min, and a step it rejects (reject_uphill) doubles λ)."
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
                "CurveBall": optimizers.curveball_description(),
                "SGD": f"momentum {optimizers.SGD_MOMENTUM}, lr {optimizers.DEFAULT_LR['SGD']}",
                "Adam": f"lr {optimizers.DEFAULT_LR['Adam']}, betas (0.9, 0.999)",
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
