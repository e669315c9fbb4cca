"""CurveBall in PyTorch Lightning: the paper's MNIST MLP, with manual optimization.

    python -m examples.lightning_mnist --data-dir ../shared/data --epochs 2
    python -m examples.lightning_mnist --data-dir ../shared/data --devices 2 --strategy ddp

ρ, β, λ and the trust ratio are logged with ``self.log_dict`` (to a CSV file under
``--logdir``); a learning-rate schedule is configured the Lightning way; under
``--strategy ddp`` every process trains on its share of each global batch and
CurveBall averages over the processes itself.
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import mlp, mnist_8k_2k
from curveball import CurveBall
from curveball.integrations.lightning import curveball_step


class MNISTClassifier(pl.LightningModule):
    def __init__(self, data_dir: str, batch_size: int) -> None:
        super().__init__()
        self.automatic_optimization = False  # CurveBall runs its own passes
        self.net = mlp((784, 128, 64, 32, 10), nn.Tanh)
        self.data_dir, self.batch_size = data_dir, batch_size

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, t = batch
        loss = curveball_step(self, lambda: self(x), lambda y: F.cross_entropy(y, t))
        self.lr_schedulers().step()
        return loss

    def validation_step(self, batch, batch_idx):
        x, t = batch
        self.log("val_accuracy", (self(x).argmax(1) == t).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        optimizer = CurveBall(self)
        # α stays 1 for the first epoch, then halves every epoch (a schedule multiplies α)
        steps = len(self.train_dataloader())
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=steps, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def _split(self, name: str) -> TensorDataset:
        data = mnist_8k_2k(self.data_dir)
        return TensorDataset(data[f"x_{name}"], data[f"y_{name}"])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._split("train"), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._split("val"), batch_size=1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128, help="per process")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--logdir", default="runs/lightning")
    args = parser.parse_args()
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        logger=pl.loggers.CSVLogger(args.logdir),
        enable_progress_bar=False,
    )
    trainer.fit(MNISTClassifier(args.data_dir, args.batch_size))
    if trainer.global_rank == 0:
        print({k: round(float(v), 4) for k, v in trainer.callback_metrics.items()})


if __name__ == "__main__":
    main()
