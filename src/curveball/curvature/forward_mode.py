"""Jacobian products by true forward-mode automatic differentiation.

The parameters are replaced, inside the module, by dual tensors ``w + ε t``
(``torch.autograd.forward_ad``), so one forward pass yields both the predictions
``y`` and their directional derivative ``J t``. With gradients enabled the same
pass also records the ordinary autograd graph of ``y``, which the backward pass
``Jᵀ u`` then uses: no separate plain forward pass is needed. A second
forward-mode pass, with gradients disabled, gives ``J v`` for another tangent.
Both passes run under :class:`~curveball.curvature.tangent_rules.LeanTangents`:
linear, convolution and pooling layers skip products with zero tangents, and
the second pass reuses the first pass's primal outputs of those layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD

from curveball.curvature.engine import JacobianEngine, ModelFn, check_predictions, owned_like
from curveball.curvature.substitution import ModuleTensors
from curveball.curvature.tangent_rules import LeanTangents

_UNSUPPORTED_MARKERS = ("forward AD", "forward-mode", "forward mode", "jvp", "fw_grad")
# e.g. "Trying to use forward AD with X that does not support it because it has not been
# implemented yet" or "You must implement the jvp function for custom autograd.Function"


class ForwardModeUnsupported(RuntimeError):
    """Raised when an operation in the model has no forward-mode derivative."""


def _is_unsupported(error: BaseException) -> bool:
    text = str(error)
    return "implement" in text.lower() and any(m in text for m in _UNSUPPORTED_MARKERS)


class ForwardModeEngine(JacobianEngine):
    """:class:`~curveball.curvature.engine.JacobianEngine` with dual numbers.

    Args:
        params: the trainable parameters.
        tensors: where they live in the module (required: dual tensors are
            substituted for the parameters while ``model_fn`` runs).
    """

    def __init__(self, params: Sequence[torch.Tensor], tensors: ModuleTensors) -> None:
        super().__init__(params, tensors)
        self._predictions: torch.Tensor | None = None
        self._records: list | None = None  # primal layer outputs of the first pass

    def _dual_pass(self, tangents: Sequence[torch.Tensor], first: bool, record: bool = False):
        assert self.tensors is not None and self._model_fn is not None
        with fwAD.dual_level() as level:
            duals = [fwAD.make_dual(p, t) for p, t in zip(self.params, tangents, strict=True)]
            rules = LeanTangents(level, replay=None if first else self._records, record=record)
            try:
                if first:  # real buffers, randomness as it comes
                    with self.tensors.substituted(duals), rules:
                        out = check_predictions(self._model_fn())
                    self._records = rules.records
                else:
                    with rules:
                        out = self.rerun(duals)
            except (RuntimeError, NotImplementedError) as error:
                if _is_unsupported(error):
                    raise ForwardModeUnsupported(str(error)) from error
                raise
            primal, tangent = fwAD.unpack_dual(out)
        if tangent is None:  # the predictions do not depend on the parameters
            tangent = torch.zeros_like(primal)
        return primal, tangent.detach()

    def linearize(
        self, model_fn: ModelFn, tangents: Sequence[torch.Tensor], *, jvp_follows: bool = True
    ):
        self._model_fn = model_fn
        self._record_rng(before=True)
        with torch.enable_grad():
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
        with torch.no_grad():
            _, tangent = self._dual_pass(tangents, first=False)
        return tangent

    def finish(self) -> None:
        self._predictions = None
        self._records = None
        super().finish()
