"""Running the model on a leading part of its batch, for a curvature mini-batch.

Hessian-free optimisation (Martens, ICML 2010) estimates curvature products on
a fraction of the batch that the gradient uses. CurveBall can do the same for
its second forward-mode pass ``J d``: while that pass runs, a forward pre-hook
on the module cuts every tensor argument whose leading size equals the first
tensor argument's to its first ``⌈f n⌉`` entries. The predictions then are the
leading rows of the whole batch's predictions: for a model that treats the
samples of its batch independently exactly those rows (for batch normalisation
in training mode, the same rows with the statistics of the smaller batch), and
for a causal sequence model fed time-first, the first time steps. Random draws
(dropout) start from the same generator state as the first pass's but are drawn
for fewer samples, so they are other masks, not the first pass's rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class LeadingRows:
    """A context in which ``module``'s calls see the first ``⌈fraction · n⌉`` of ``n`` rows.

    Attributes:
        outcome: after the context, ``"cut"`` if a call of the module had its arguments
            cut, ``"whole"`` if the module saw batches too small to cut, ``"unseen"``
            if it was not called with a tensor argument.
    """

    def __init__(self, module: nn.Module, fraction: float) -> None:
        self.module = module
        self.fraction = fraction
        self.outcome = "unseen"

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        first = next(
            (v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0),
            None,
        )
        if first is None:
            return None
        n = first.shape[0]
        m = max(1, math.ceil(self.fraction * n))
        if m >= n:
            if self.outcome == "unseen":
                self.outcome = "whole"
            return None
        self.outcome = "cut"

        def cut(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
                return v[:m]
            return v

        return tuple(cut(v) for v in args), {k: cut(v) for k, v in kwargs.items()}

    @contextmanager
    def active(self) -> Iterator[LeadingRows]:
        handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()


def leading_rows(full: torch.Size, part: torch.Size) -> int | None:
    """The number of leading rows of predictions shaped ``full`` that ``part`` holds,
    or ``None`` if ``part`` is not shaped like such rows."""
    if len(full) == 0 or len(part) != len(full) or part[1:] != full[1:]:
        return None
    if not 0 < part[0] <= full[0]:
        return None
    return int(part[0])
