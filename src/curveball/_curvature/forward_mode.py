"""Jacobian products by true forward-mode automatic differentiation.

The parameters are replaced, inside the module, by dual tensors ``w + ε t``
(``torch.autograd.forward_ad``), so one forward pass yields both the predictions
``y`` and their directional derivative ``J t``. With gradients enabled the same
pass also records the ordinary autograd graph of ``y``, which the backward pass
``Jᵀ u`` then uses: no separate plain forward pass is needed. A second
forward-mode pass, on detached parameters (so no graph is recorded), gives
``J v`` for another tangent. Both passes run under
:class:`~curveball._curvature.lean_rules.LeanTangents`: lean rules for the
layers that dominate a pass, replay of the first pass's primal results in the
second, and ``torch.no_grad()`` blocks inside the model stopping tangents as
they stop gradients. The second pass can also run on a leading part of the
batch only (:mod:`~curveball._curvature.row_subset`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD

from curveball._curvature.engine import (
    JacobianEngine,
    ModelFn,
    check_predictions,
    independent_predictions,
    owned_like,
)
from curveball._curvature.lean_rules import LeanTangents
from curveball._curvature.module_tensors import ModuleTensors
from curveball._curvature.row_subset import LeadingRows


class ForwardModeEngine(JacobianEngine):
    """:class:`~curveball._curvature.engine.JacobianEngine` with dual numbers.

    Args:
        params: the trainable parameters.
        tensors: where they live in the module (required: dual tensors are
            substituted for the parameters while ``model_fn`` runs).
    """

    def __init__(self, params: Sequence[torch.Tensor], tensors: ModuleTensors) -> None:
        super().__init__(params, tensors)
        self._predictions: torch.Tensor | None = None
        self._records: list | None = None  # primal layer outputs of the first pass

    def _dual_pass(
        self,
        tangents: Sequence[torch.Tensor],
        first: bool,
        record: bool = False,
        replay: bool = True,
    ):
        assert self.tensors is not None and self._model_fn is not None
        with fwAD.dual_level() as level, torch.enable_grad():
            primals = self.params if first else [p.detach() for p in self.params]
            duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)]
            records = None if first or not replay else self._records
            rules = LeanTangents(level, replay=records, record=record)
            if first:  # real buffers, randomness as it comes
                with self.tensors.substituted(duals), rules:
                    out = check_predictions(self._model_fn())
                self._records = rules.records
            else:
                with rules:
                    out = self.rerun(duals)
            primal, tangent = fwAD.unpack_dual(out)
        if tangent is None:
            if first and not primal.requires_grad:
                raise independent_predictions()
            tangent = torch.zeros_like(primal)  # no parameter reaches the predictions in J
        return primal, tangent.detach()

    def linearize(
        self, model_fn: ModelFn, tangents: Sequence[torch.Tensor], *, jvp_follows: bool = True
    ):
        self._model_fn = model_fn
        self._record_rng(before=True)
        primal, tangent = self._dual_pass(tangents, first=True, record=jvp_follows)
        self._record_rng(before=False)
        self._predictions = primal
        return primal, tangent

    def vjp(self, cotangent: torch.Tensor) -> list[torch.Tensor]:
        assert self._predictions is not None
        if not self._predictions.requires_grad:
            return owned_like([None] * len(self.params), self.params)
        grads = torch.autograd.grad(self._predictions, self.params, cotangent, allow_unused=True)
        self._predictions = self._predictions.detach()  # the graph is gone
        return owned_like(grads, self.params)

    def jvp(self, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
        _, tangent = self._dual_pass(tangents, first=False)
        return tangent

    def jvp_leading_rows(
        self, tangents: Sequence[torch.Tensor], fraction: float
    ) -> tuple[torch.Tensor, str]:
        assert self.tensors is not None
        rows = LeadingRows(self.tensors.module, fraction)
        with rows.active():  # the first pass's primal results belong to the whole batch
            _, tangent = self._dual_pass(tangents, first=False, replay=False)
        return tangent, rows.outcome

    def finish(self) -> None:
        self._predictions = None
        self._records = None
        super().finish()
