"""A small CurveBall run under PyTorch Lightning, for the integration tests.

``python -m tests.integrations.lightning_job OUT STRATEGY DEVICES`` trains a float64
classifier for 2 epochs of 3 global batches of 16 samples (the samples split between
the processes) and writes the final parameters and the logged λ to OUT.
"""

from __future__ import annotations

import sys

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from curveball import CurveBall
from curveball.integrations.lightning import curveball_step

GLOBAL_BATCH, BATCHES = 16, 3


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(GLOBAL_BATCH * BATCHES, 5, generator=g, dtype=torch.float64)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


class Classifier(pl.LightningModule):
    def __init__(self, scheduler: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        self.scheduler = scheduler
        self.losses: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, t = batch
        loss = curveball_step(self, lambda: self(x), lambda y: F.cross_entropy(y, t))
        self.losses.append(float(loss))
        if self.scheduler:
            self.lr_schedulers().step()
        return loss

    def train_dataloader(self) -> DataLoader:
        """Each process takes its contiguous share of every global batch."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        share = GLOBAL_BATCH // world
        mine = [b * GLOBAL_BATCH + rank * share + i for b in range(BATCHES) for i in range(share)]
        return DataLoader(Subset(data(), mine), batch_size=share, shuffle=False)

    def configure_optimizers(self):
        optimizer = CurveBall(self, lambda_interval=2)
        if not self.scheduler:
            return optimizer
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def trainer(max_epochs: int, strategy: str = "auto", devices: int = 1, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        strategy=strategy,
        devices=devices,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the module shards the data itself
        **kwargs,
    )


def main(out: str, strategy: str, devices: int) -> None:
    module = Classifier()
    fit = trainer(2, strategy, devices, enable_checkpointing=False)
    fit.fit(module)
    if fit.global_rank == 0:
        params = [p.detach().clone() for p in module.parameters()]
        lambd = float(fit.callback_metrics["curveball/lambd"])
        torch.save({"params": params, "lambd": lambd, "steps": fit.global_step}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
