"""Losses with closed-form derivatives in the predictions.

A CurveBall step needs the loss ``L``, its gradient ``J_L = dL/dy`` and two
products with its Hessian ``H_L = d²L/dy²`` at the predictions ``y``. For an
arbitrary ``loss_fn`` they come from automatic differentiation (a graph of the
loss, a backward pass for ``J_L`` and a double-backward pass per product). The
two losses that almost every model is trained with have them in closed form,
which skips those passes; pass one of these objects as ``loss_fn``:

* :func:`cross_entropy` — with ``p = softmax(y)`` and the target distribution
  ``q`` (one-hot, label-smoothed, or given as probabilities), per row
  ``L = −Σ_c q_c log p_c``, ``J_L = p − q`` and ``H_L v = p ⊙ v − p (pᵀv)``
  (the softmax Hessian, which does not depend on ``q``).
* :func:`mse_loss` — ``L = Σ (y − t)²``, ``J_L = 2 (y − t)``, ``H_L v = 2 v``.

Both divide by what :func:`torch.nn.functional.cross_entropy` and
:func:`~torch.nn.functional.mse_loss` divide by under ``reduction="mean"``. Each
object is also an ordinary callable ``y ↦ L`` (the PyTorch function), so the
same ``loss_fn`` works with any optimizer, and :class:`CurveBall` treats it like
any other ``loss_fn`` except for the shortcut. Both Hessians are positive
semi-definite, so the convexity safeguard never applies to them.

Use::

    from curveball.losses import cross_entropy

    optimizer.step(lambda: model(x), cross_entropy(targets))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Hvp = Callable[[torch.Tensor], torch.Tensor]

REDUCTIONS = ("mean", "sum")


class ClosedFormLoss:
    """A loss ``y ↦ L`` that also gives ``L``, ``J_L`` and ``v ↦ H_L v`` in closed form."""

    def __call__(self, predictions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def derivatives(self, predictions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Hvp]:
        """``(L, J_L, v ↦ H_L v)`` at ``predictions`` (detached, same dtype)."""
        raise NotImplementedError


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction


class CrossEntropy(ClosedFormLoss):
    r"""Softmax cross-entropy of logits against class indices or probabilities.

    The same loss as :func:`torch.nn.functional.cross_entropy` (without class
    weights). With ``p = softmax(y)`` over the class dimension (dimension 1, or 0
    for unbatched logits) and ``q`` the target distribution — one-hot for class
    indices, ``(1 − ε) q + ε / C`` with label smoothing ``ε`` — every position
    contributes ``−Σ_c q_c log p_c``, with gradient ``p − q`` and Hessian
    ``diag(p) − p pᵀ``. Positions whose index is ``ignore_index`` contribute
    nothing; ``reduction="mean"`` divides by the number of other positions.

    Args:
        target: class indices (integer, the logits' shape without the class
            dimension) or class probabilities (floating point, the logits' shape).
        ignore_index: an index target that is skipped.
        label_smoothing: ``ε ∈ [0, 1]``.
        reduction: ``"mean"`` or ``"sum"``.
    """

    def __init__(
        self,
        target: torch.Tensor,
        *,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target: expected a torch.Tensor, got {type(target).__name__}")
        if target.is_complex() or target.dtype == torch.bool:
            raise TypeError(
                f"target: expected class indices (integers) or probabilities, got {target.dtype}"
            )
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
        self.target = target
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        self.reduction = _check_reduction(reduction)

    def __call__(self, predictions: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            predictions,
            self.target,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
        )

    def _distribution(self, y: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``q`` shaped like ``y``, and the mask of counted positions (index targets)."""
        classes = y.shape[dim]
        eps = self.label_smoothing
        if self.target.is_floating_point():
            if self.target.shape != y.shape:
                raise ValueError(
                    f"cross_entropy: probability targets must have the logits' shape "
                    f"{tuple(y.shape)}, got {tuple(self.target.shape)}"
                )
            q = self.target.to(y.dtype)
            return (q if eps == 0.0 else q * (1.0 - eps) + eps / classes), None
        expected = y.shape[:dim] + y.shape[dim + 1 :]
        if self.target.shape != expected:
            raise ValueError(
                f"cross_entropy: index targets must have shape {tuple(expected)} for logits of "
                f"shape {tuple(y.shape)}, got {tuple(self.target.shape)}"
            )
        keep = self.target != self.ignore_index
        index = torch.where(keep, self.target, 0).unsqueeze(dim)
        q = torch.zeros_like(y).scatter_(dim, index, 1.0)  # no host sync, unlike one_hot
        if eps != 0.0:
            q = q * (1.0 - eps) + eps / classes
        mask = keep.unsqueeze(dim).to(y.dtype)
        return q * mask, mask

    def derivatives(self, predictions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Hvp]:
        y = predictions.detach()
        dim = 1 if y.dim() >= 2 else 0
        log_p = torch.log_softmax(y, dim)
        p = log_p.exp()
        q, mask = self._distribution(y, dim)
        if mask is not None:
            p = p * mask  # ignored positions: no gradient, no curvature
            count = mask.sum()
        else:
            count = torch.tensor(float(y.numel() // y.shape[dim]), dtype=y.dtype, device=y.device)
        scale = 1.0 / count if self.reduction == "mean" else torch.ones_like(count)
        loss = -(q * log_p).sum() * scale
        grad = (p - q) * scale
        p_scaled = p * scale

        def hvp(v: torch.Tensor) -> torch.Tensor:
            v = v.to(p.dtype)
            return p_scaled * (v - (p * v).sum(dim, keepdim=True))

        return loss, grad, hvp


class MeanSquaredError(ClosedFormLoss):
    """The squared error ``Σ (y − t)²`` (divided by the number of elements for ``"mean"``),
    the loss of :func:`torch.nn.functional.mse_loss`.

    Args:
        target: the target values, shaped like the predictions.
        reduction: ``"mean"`` or ``"sum"``.
    """

    def __init__(self, target: torch.Tensor, *, reduction: str = "mean") -> None:
        if not isinstance(target, torch.Tensor) or not target.is_floating_point():
            raise TypeError("target: expected a floating-point torch.Tensor")
        self.target = target
        self.reduction = _check_reduction(reduction)

    def __call__(self, predictions: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(predictions, self.target, reduction=self.reduction)

    def derivatives(self, predictions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Hvp]:
        y = predictions.detach()
        if self.target.shape != y.shape:
            raise ValueError(
                f"mse_loss: the target's shape {tuple(self.target.shape)} differs from the "
                f"predictions' {tuple(y.shape)}"
            )
        scale = 2.0 / y.numel() if self.reduction == "mean" else 2.0
        residual = y - self.target.to(y.dtype)
        loss = residual.square().sum() * (scale / 2.0)
        return loss, residual * scale, lambda v: v.to(y.dtype) * scale


def cross_entropy(
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> CrossEntropy:
    """``loss_fn`` for softmax cross-entropy against ``target`` (see :class:`CrossEntropy`)."""
    return CrossEntropy(
        target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction
    )


def mse_loss(target: torch.Tensor, *, reduction: str = "mean") -> MeanSquaredError:
    """``loss_fn`` for the mean squared error against ``target`` (see :class:`MeanSquaredError`)."""
    return MeanSquaredError(target, reduction=reduction)
