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
    reaches,
)
from curveball._curvature.input_derivatives import InputDerivativesSeen, ModelTraits
from curveball._curvature.lean_rules import LeanTangents
from curveball._curvature.module_tensors import ModuleTensors
from curveball._curvature.row_subset import LeadingRows


class ForwardModeEngine(JacobianEngine):
    """:class:`~curveball._curvature.engine.JacobianEngine` with dual numbers.

    A model function that differentiates the network with respect to its inputs
    (``torch.autograd.grad`` inside ``model_fn``) runs without the lean rules and
    replay; one that runs forward-mode transforms itself (``torch.func.jacfwd``,
    ``hessian``, in which dual tensors cannot be nested) runs its passes as
    ``torch.func.jvp``. The first pass that meets either raises
    :class:`~curveball._curvature.input_derivatives.InputDerivativesSeen` and marks
    ``traits``, and the step is computed again (by
    :class:`~curveball._curvature.engine_choice.EngineChoice`).

    Args:
        params: the trainable parameters.
        tensors: where they live in the module (required: dual tensors are
            substituted for the parameters while ``model_fn`` runs).
        traits: what is known of ``model_fn``, shared with the other engine.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        tensors: ModuleTensors,
        traits: ModelTraits | None = None,
    ) -> None:
        super().__init__(params, tensors, traits)
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
        self.current_pass = "the first pass (y, J z)" if first else "the second pass (J Δz)"
        primals = self.params if first else [p.detach() for p in self.params]
        if self.traits.nested_forward:
            primal, tangent = self._transformed_pass(primals, tangents, first)
        else:
            try:
                primal, tangent = self._pass_with_duals(primals, tangents, first, record, replay)
            except InputDerivativesSeen:
                self.traits.input_derivatives = True
                raise
            except RuntimeError as error:
                if "Nested forward mode AD is not supported" not in str(error):
                    raise
                self.traits.nested_forward = True  # jacfwd or hessian inside model_fn
                raise InputDerivativesSeen(str(error)) from error
        if tangent is None:
            if first and (not primal.requires_grad or not reaches(primal, self.params)):
                raise independent_predictions()
            tangent = torch.zeros_like(primal)  # no parameter reaches the predictions in J
        return primal, tangent.detach()

    def _pass_with_duals(self, primals, tangents, first: bool, record: bool, replay: bool):
        """The pass with dual tensors in the module (``torch.autograd.forward_ad``)."""
        lean = not self.traits.input_derivatives
        with fwAD.dual_level() as level, torch.enable_grad():
            duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)]
            records = None if first or not replay or not lean else self._records
            rules = LeanTangents(level, replay=records, record=record and lean, lean=lean)
            if first:  # real buffers, randomness as it comes
                with self.tensors.substituted(duals), rules:
                    out = check_predictions(self._model_fn())
                self._records = rules.records
            else:
                with rules:
                    out = self.rerun(duals)
            return tuple(fwAD.unpack_dual(out))

    def _transformed_pass(self, primals, tangents, first: bool):
        """The pass as ``torch.func.jvp`` of the module's function of its parameters, for a
        ``model_fn`` that runs forward-mode transforms itself (``jacfwd``, ``hessian``):
        dual tensors cannot be nested in them, ``torch.func.jvp`` can. The primal result
        keeps its autograd graph for the backward pass."""

        def run(*params: torch.Tensor) -> torch.Tensor:
            if not first:
                return self.rerun(params)
            with self.tensors.substituted(params):
                return check_predictions(self._model_fn())

        with torch.enable_grad():
            primal, tangent = torch.func.jvp(run, tuple(primals), tuple(tangents))
        if first and not reaches(primal, self.params):
            raise independent_predictions()
        return primal, tangent

    def linearize(
        self, model_fn: ModelFn, tangents: Sequence[torch.Tensor], *, jvp_follows: bool = True
    ):
        self._model_fn = model_fn
        self._record_rng(before=True)
        primal, tangent = self._dual_pass(tangents, first=True, record=jvp_follows)
        self._record_rng(before=False)
        self._predictions = primal
        return primal, tangent

    def vjp(self, cotangent: torch.Tensor, keep_graph: bool = False) -> list[torch.Tensor]:
        assert self._predictions is not None
        self.current_pass = "the backward pass (Δz)"
        if not self._predictions.requires_grad:
            return owned_like([None] * len(self.params), self.params)
        grads = torch.autograd.grad(
            self._predictions, self.params, cotangent, retain_graph=keep_graph, allow_unused=True
        )
        if not keep_graph:
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
