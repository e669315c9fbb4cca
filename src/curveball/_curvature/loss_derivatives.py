"""Derivatives of the loss with respect to the predictions.

CurveBall needs, at the predictions ``y``, the loss ``L``, its gradient
``J_L = dL/dy`` and products with its Hessian ``H_L = d²L/dy²``. They are
computed by automatic differentiation of ``loss_fn`` with respect to ``y`` only,
which is cheap because ``y`` is small compared with the parameters, and works
for any scalar loss that is twice differentiable in ``y``.

*Losses that are not convex in the predictions.* The method needs a positive
semi-definite curvature ``G = Jᵀ H_L J``; with an indefinite ``H_L`` (a smooth
``1 − p_correct``, a robust Welsch or Cauchy regression loss, a negated
likelihood term) the quadratic model has no minimiser. With ``psd=True``,
``H_L`` is replaced by its positive part, computed per sample: for a loss that
sums or averages over the samples (the first dimension of ``y``), ``H_L`` is
block-diagonal with one ``C × C`` block per sample (``C`` the number of
predictions per sample); each block ``B = V diag(μ) Vᵀ`` becomes
``V diag(max(μ, 0)) Vᵀ``. That is the nearest positive semi-definite matrix to
``H_L`` (in the Frobenius norm, block by block), it equals ``H_L`` wherever
``H_L`` is already positive semi-definite, and it keeps the curvature that the
loss has, unlike a Fisher substitute built from gradients alone. It costs ``C``
Hessian-vector products in ``y`` and a batched ``C × C`` eigendecomposition per
step, so it is offered for ``C ≤`` :data:`MAX_CLAMPED_OUTPUTS`.

*Closed forms.* A ``loss_fn`` from :mod:`curveball.losses` (cross-entropy,
squared error) brings ``L``, ``J_L`` and ``H_L v`` in closed form: no graph of
the loss is built and no autograd pass runs; its Hessian is positive
semi-definite, so ``psd`` does not apply.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from curveball._param_vectors import HALF_PRECISION
from curveball.losses import ClosedFormLoss, Hvp

MAX_CLAMPED_OUTPUTS = 256
"""The largest number of predictions per sample for which ``psd=True`` is offered."""

COLUMN_CHUNK = 1 << 22
""":meth:`LossDerivatives.hvp_columns` multiplies this many entries (columns × predictions)
per batched product at most, bounding its memory."""

UNBATCHED = (
    "CurveBall: the products of the loss's Hessian could not be batched ({error}); forming "
    "the dense Gauss-Newton matrix takes one backward pass of the loss per column of J. "
    "A loss from curveball.losses, or one written with operations that torch.vmap supports, "
    "batches them"
)
"""The warning when :meth:`LossDerivatives.hvp_columns` goes column by column."""


class LossDerivatives:
    """``L``, ``J_L`` and ``v ↦ H_L v`` of ``loss_fn`` at the predictions ``y``.

    Args:
        loss_fn: maps predictions to a scalar loss tensor.
        predictions: the point ``y``; it is detached from any graph.
        psd: use the positive part of ``H_L``, per sample (see the module doc).
        upcast: work in float32 at least (float16 or bfloat16 predictions are
            converted, and so are the vectors given to :meth:`hvp`).

    Raises:
        TypeError: if ``loss_fn`` does not return a floating-point scalar tensor.
    """

    def __init__(
        self,
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        predictions: torch.Tensor,
        psd: bool = False,
        upcast: bool = False,
    ):
        predictions = predictions.detach()
        self._upcast = upcast and predictions.dtype in HALF_PRECISION
        if self._upcast:
            predictions = predictions.float()
        self._closed: Hvp | None = None
        self._blocks: torch.Tensor | None = None
        if isinstance(loss_fn, ClosedFormLoss):
            self.predictions = predictions
            self.loss, self.grad, self._closed = loss_fn.derivatives(predictions)
            self._linear = False
            return
        self.predictions = predictions.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(self.predictions)
            if not isinstance(loss, torch.Tensor):
                raise TypeError(
                    f"loss_fn must return a scalar torch.Tensor, got {type(loss).__name__}"
                )
            if loss.is_complex():
                raise TypeError(
                    f"loss_fn must return a real loss, got dtype {loss.dtype} (a complex loss "
                    "has no minimum: take its absolute value or real part)"
                )
            if loss.numel() != 1 or not loss.is_floating_point():
                raise TypeError(
                    "loss_fn must return a floating-point scalar tensor (one element), "
                    f"got shape {tuple(loss.shape)} and dtype {loss.dtype}"
                )
            loss = loss.reshape(())
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss, self.predictions, create_graph=True)
            else:  # the loss does not depend on the predictions
                grad = torch.zeros_like(self.predictions)
        self.loss = loss.detach()
        self.grad = grad  # J_L, still attached to the loss graph for H_L products
        self._linear = not grad.requires_grad
        if psd and not self._linear:
            self._blocks = self._positive_blocks()

    @staticmethod
    def can_clamp(predictions: torch.Tensor) -> bool:
        """Whether ``psd=True`` is offered for predictions of this shape."""
        return predictions.dim() >= 1 and predictions[0].numel() <= MAX_CLAMPED_OUTPUTS

    def _positive_blocks(self) -> torch.Tensor:
        """The per-sample blocks of ``H_L`` with their negative eigenvalues set to zero."""
        y = self.predictions
        if not self.can_clamp(y):
            raise ValueError(
                f"psd: per-sample Hessian blocks of {y[0].numel()} predictions exceed "
                f"{MAX_CLAMPED_OUTPUTS}"
            )
        batch, width = y.shape[0], y[0].numel()
        probes = torch.eye(width, dtype=y.dtype, device=y.device)  # e_c in every sample at once
        probes = probes[:, None, :].expand(width, batch, width).reshape(width, *y.shape)
        (columns,) = torch.autograd.grad(
            self.grad, y, probes, retain_graph=True, is_grads_batched=True
        )
        blocks = columns.reshape(width, batch, width).permute(1, 2, 0).to(torch.float64)
        blocks = 0.5 * (blocks + blocks.transpose(1, 2))
        values, vectors = torch.linalg.eigh(blocks)
        positive = (vectors * values.clamp_min(0.0)[:, None, :]) @ vectors.transpose(1, 2)
        return positive.to(y.dtype)

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        """``H_L v`` (or its positive part's) for a tangent ``v`` shaped like the predictions."""
        if self._upcast:
            vector = vector.float()
        if self._linear:
            return torch.zeros_like(vector)
        if self._closed is not None:
            return self._closed(vector)
        if self._blocks is not None:
            flat = vector.reshape(vector.shape[0], -1, 1)
            return (self._blocks @ flat).reshape(vector.shape)
        (out,) = torch.autograd.grad(
            self.grad, self.predictions, vector, retain_graph=True, allow_unused=True
        )
        return torch.zeros_like(vector) if out is None else out

    def hvp_columns(self, matrix: torch.Tensor) -> torch.Tensor:
        """``H_L M`` for the columns of ``M`` (predictions × ``k``, each column a tangent of
        the predictions flattened), as one batched product per chunk of columns rather
        than ``k`` products: the dense Gauss-Newton matrix ``Jᵀ H_L J`` needs it for all
        ``D`` columns of ``J``. Returned in ``M``'s dtype.

        An autograd loss runs ``torch.autograd.grad(..., is_grads_batched=True)`` (the
        backward pass under ``torch.vmap``); where one of its operations has no batching
        rule, the columns go one by one, with a warning.
        """
        shape = self.predictions.shape
        rows, count = matrix.shape
        if rows != shape.numel():
            raise ValueError(
                f"hvp_columns: expected {shape.numel()} rows (the predictions), got {rows}"
            )
        dtype = self.predictions.dtype  # float32 at least where upcast
        if self._linear or count == 0:
            return torch.zeros_like(matrix)
        width = max(1, COLUMN_CHUNK // max(rows, 1))
        out = []
        for start in range(0, count, width):
            block = matrix[:, start : start + width].T.to(dtype).reshape(-1, *shape)
            out.append(self._batched(block).reshape(block.shape[0], -1).T.to(matrix.dtype))
        return torch.cat(out, dim=1)

    def _batched(self, vectors: torch.Tensor) -> torch.Tensor:
        """``H_L v`` for each ``v`` along the first dimension of ``vectors``."""
        if self._closed is not None:
            return torch.vmap(self._closed)(vectors)
        if self._blocks is not None:
            batch = vectors.shape[0]
            flat = vectors.reshape(batch, self._blocks.shape[0], -1).permute(1, 2, 0)
            return (self._blocks @ flat).permute(2, 0, 1).reshape(vectors.shape)
        try:
            (out,) = torch.autograd.grad(
                self.grad,
                self.predictions,
                vectors,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        except RuntimeError as error:
            message = UNBATCHED.format(error=str(error).splitlines()[0])
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            return torch.stack([self.hvp(v) for v in vectors])
        return torch.zeros_like(vectors) if out is None else out

    def release(self) -> None:
        """Free the loss graph."""
        self.grad = self.grad.detach()
        self._linear = True
        self._blocks = None
        self._closed = None
