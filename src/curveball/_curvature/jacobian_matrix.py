"""Jacobian products from the Jacobian itself, for a model function that brings it.

A residual written point by point (:class:`curveball.pointwise.PointwiseResidual`)
gives its whole Jacobian ``J`` (``N × D``) by one batched reverse-mode pass per point,
together with its values. With ``J`` at hand every product of a step is a matrix
product — ``J t`` and ``Jᵀ u`` in float64, with no pass through the model — and the
step's only passes are the one forming ``J`` and the evaluations of the trust-region
test. Used where ``J`` is small enough to hold (:data:`MATRIX_LIMIT` entries).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from curveball._curvature.engine import JacobianEngine, ModelFn, check_predictions
from curveball._param_vectors import real_view
from curveball._undo import buffers_kept
from curveball.pointwise import PointwiseResidual

MATRIX_LIMIT = 2**26
"""The largest number of entries of ``J`` (points × parameters; 512 MiB in float64) for
which the products of a step come from ``J``; beyond it, from passes through the model."""


def takes_matrix(model_fn: object, params: Sequence[torch.Tensor]) -> bool:
    """Whether the products of a step with ``model_fn`` come from its Jacobian: a
    :class:`~curveball.pointwise.PointwiseResidual` on real parameters whose ``J`` (at least
    one row per point) stays within :data:`MATRIX_LIMIT` entries."""
    if not isinstance(model_fn, PointwiseResidual) or any(p.is_complex() for p in params):
        return False
    return model_fn.size() * sum(p.numel() for p in params) <= MATRIX_LIMIT


class JacobianMatrixEngine(JacobianEngine):
    """:class:`~curveball._curvature.engine.JacobianEngine` on the matrix ``J`` that
    ``model_fn.linearize(params)`` returns with the predictions."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        super().__init__(params, None)
        self.matrix: torch.Tensor | None = None
        self._storage: torch.Tensor | None = None  # J's memory, kept from step to step
        self._shape: torch.Size | None = None
        self._dtype: torch.dtype | None = None

    def linearize(
        self, model_fn: ModelFn, tangents: Sequence[torch.Tensor], *, jvp_follows: bool = True
    ):
        self.current_pass = "the Jacobian of the pointwise residual"
        self._model_fn = model_fn
        self._record_rng(before=True)
        values, self.matrix = model_fn.linearize(  # type: ignore[attr-defined]
            self.params, out=self._storage
        )
        base = self.matrix._base  # the whole buffer J is a view of, if it is one
        self._storage = self.matrix if base is None else base
        self._record_rng(before=False)
        y = check_predictions(values)
        self._shape, self._dtype = y.shape, y.dtype
        return y, self.jvp(tangents)

    def jvp(self, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
        assert self.matrix is not None and self._shape is not None
        flat = torch.cat([real_view(t).reshape(-1) for t in tangents]).double()
        return (self.matrix @ flat).to(self._dtype).view(self._shape)

    def vjp(self, cotangent: torch.Tensor, keep_graph: bool = False) -> list[torch.Tensor]:
        assert self.matrix is not None
        flat = self.matrix.T @ cotangent.reshape(-1).double()
        pieces = torch.split(flat, [p.numel() for p in self.params])
        return [x.view(p.shape).to(p.dtype) for x, p in zip(pieces, self.params, strict=True)]

    def evaluate(self) -> torch.Tensor:
        """The residual at the current parameters, without a parameter graph."""
        self.current_pass = "the evaluation of the trust-region test"
        assert self._model_fn is not None and self._rng_before is not None
        self._rng_before.restore()
        with torch.no_grad(), buffers_kept():
            return check_predictions(self._model_fn()).detach()

    def finish(self) -> None:
        """Free what the step holds; ``J``'s memory stays for the next step's ``J``."""
        super().finish()
        self.matrix = None
