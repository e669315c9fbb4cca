"""CurveBall in PyTorch Lightning, with manual optimization.

CurveBall runs its own forward-mode and backward passes, so a Lightning module
uses manual optimization and hands the optimizer the model and the loss::

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = ...

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, t = batch
            return curveball_step(self, lambda: self(x), lambda y: F.cross_entropy(y, t))

        def configure_optimizers(self):
            return CurveBall(self)

:func:`curveball_step` calls ``self.optimizers().step(model_fn=..., loss_fn=...)``
through Lightning's optimizer wrapper (so its hooks run), logs ρ, β, λ, the trust
ratio and the loss with ``self.log_dict`` and returns the loss. Lightning's
``ModelCheckpoint`` saves the optimizer's state dict, which holds everything a
resumed run needs; learning-rate schedulers returned by ``configure_optimizers``
are stepped by the module (``self.lr_schedulers().step()``), as in any manual
optimization.

Under ``strategy="ddp"`` Lightning wraps the module in ``DistributedDataParallel``,
but CurveBall is built on the module itself and runs its passes through
``self(x)``: the wrapper's gradient hooks never fire (CurveBall takes no
``.grad``), and CurveBall averages over the default process group itself, so a
step on ``k`` processes equals one step on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

LOGGED = ("loss", "rho", "beta", "lambd", "trust_ratio")
"""The :class:`~curveball.StepInfo` fields that :func:`curveball_step` logs."""


def curveball_step(
    module: Any,
    model_fn: Callable[[], torch.Tensor],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    optimizer: Any = None,
    log: bool = True,
    prefix: str = "curveball/",
    **log_kwargs: Any,
) -> torch.Tensor:
    """One CurveBall step from a ``training_step``; returns the loss (detached).

    Args:
        module: the ``LightningModule`` (with ``automatic_optimization = False``).
        model_fn: runs the model on the batch, e.g. ``lambda: module(x)``.
        loss_fn: maps the predictions to the scalar loss.
        optimizer: the wrapped optimizer; by default ``module.optimizers()``.
        log: log :data:`LOGGED` with ``module.log_dict`` (``nan`` where not measured).
        prefix: the prefix of the logged names.
        **log_kwargs: passed to ``log_dict`` (default ``on_step=True``).
    """
    if getattr(module, "automatic_optimization", True):
        raise RuntimeError(
            "curveball_step: set self.automatic_optimization = False in the LightningModule; "
            "CurveBall runs its own backward pass"
        )
    optimizer = optimizer if optimizer is not None else module.optimizers()
    loss, _ = optimizer.step(model_fn=model_fn, loss_fn=loss_fn)
    inner = getattr(optimizer, "optimizer", optimizer)
    if log and inner.last is not None:
        values = inner.last.as_dict()
        log_kwargs.setdefault("on_step", True)
        module.log_dict({prefix + name: values[name] for name in LOGGED}, **log_kwargs)
    return loss
