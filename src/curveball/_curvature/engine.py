"""The interface shared by the Jacobian-product engines, and the errors they raise."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from curveball._curvature.input_derivatives import InputDerivativeWatch, ModelTraits
from curveball._curvature.module_tensors import ModuleTensors
from curveball._undo import RngSnapshot, buffers_kept

ModelFn = Callable[[], torch.Tensor]


class DoubleBackwardUnsupported(RuntimeError):
    """Neither forward-mode AD nor a differentiable backward pass works through the model."""


def check_predictions(out: object) -> torch.Tensor:
    """Return ``out`` if it is a floating-point tensor, else raise a clear ``TypeError``."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"model_fn must return a torch.Tensor of predictions, got {type(out).__name__}"
        )
    if not out.is_floating_point():
        raise TypeError(
            f"model_fn must return real floating-point predictions, got dtype {out.dtype}"
            + (" (return torch.view_as_real(y) for complex ones)" if out.is_complex() else "")
        )
    return out


def independent_predictions() -> ValueError:
    """The error for predictions that do not depend on the optimized parameters."""
    return ValueError(
        "model_fn: the predictions do not depend on the optimized parameters, so there is "
        "nothing to optimize. Check that model_fn does not run under torch.inference_mode() or "
        "torch.no_grad(), does not detach its output, and that the parameters given to the "
        "optimizer are the ones the model uses (with requires_grad=True)."
    )


def reaches(out: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
    """Whether the autograd graph of ``out`` leads to any of ``params`` (a walk of the
    graph's nodes, no computation): ``out`` may require gradients through its inputs
    alone (input derivatives) without depending on the parameters."""
    targets = {id(p) for p in params}
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in targets:
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


def owned_like(tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]):
    """Per-parameter results the caller may update in place, laid out like ``like``.

    ``None`` (an unused parameter) becomes zeros. Gradients from autograd may
    alias one another or the incoming cotangent (``y = p1 + p2`` hands both the
    same tensor, ``y = p.sum()`` an expanded view); those are copied, and so is
    any result whose memory layout differs from its parameter's. (Two results
    never share a storage afterwards.)
    """
    out, seen = [], set()
    for t, r in zip(tensors, like, strict=True):
        if t is None:
            t = torch.zeros_like(r, memory_format=torch.preserve_format)
        else:
            storage = t.untyped_storage().data_ptr()
            if storage in seen or t.stride() != r.stride():
                t = torch.empty_like(r, memory_format=torch.preserve_format).copy_(t)
        seen.add(t.untyped_storage().data_ptr())
        out.append(t)
    return out


class JacobianEngine(ABC):
    """Products with the Jacobian ``J = dy/dw`` of the predictions, at one point and batch.

    One CurveBall iteration calls :meth:`linearize` once (the pass that produces
    the predictions), then any number of :meth:`vjp` and :meth:`jvp` at that same
    point and batch, optionally :meth:`evaluate` at the (moved) parameters, and
    finally :meth:`finish`.

    Args:
        params: the trainable parameters ``w``.
        tensors: where they live inside the model (``None`` for bare parameters).
        traits: what is known of ``model_fn`` (shared between the engines of a step).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        tensors: ModuleTensors | None,
        traits: ModelTraits | None = None,
    ) -> None:
        self.params = list(params)
        self.tensors = tensors
        self.traits = traits if traits is not None else ModelTraits()
        self.current_pass = "the first pass (y, J z)"  # for messages about a failure
        self._model_fn: ModelFn | None = None
        self._rng_before: RngSnapshot | None = None
        self._rng_after: RngSnapshot | None = None

    @abstractmethod
    def linearize(
        self, model_fn: ModelFn, tangents: Sequence[torch.Tensor], *, jvp_follows: bool = True
    ):
        """Run ``model_fn`` and return ``(y, J t)``.

        ``y`` are the predictions, still attached to the autograd graph so that
        :meth:`vjp` can back-propagate through them; ``J t`` is detached.
        ``jvp_follows=False`` promises that :meth:`jvp` will not be called at this
        point, so nothing needs to be kept for it.

        Raises:
            ValueError: if the predictions do not depend on the parameters.
        """

    @abstractmethod
    def vjp(self, cotangent: torch.Tensor, keep_graph: bool = False) -> list[torch.Tensor]:
        """``Jᵀ u`` for ``u`` shaped like the predictions, one tensor per parameter
        (``keep_graph``: more products at this point follow)."""

    @abstractmethod
    def jvp(self, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
        """``J v`` at the linearization point and batch, detached."""

    def jvp_leading_rows(
        self, tangents: Sequence[torch.Tensor], fraction: float
    ) -> tuple[torch.Tensor, str]:
        """``J v`` on the first ``⌈fraction · n⌉`` samples of the batch, if this engine
        can run the model on them (:mod:`~curveball._curvature.row_subset`), and the
        outcome: ``"cut"``, or, computed on the whole batch, ``"whole"`` (the batch
        is too small to cut), ``"unseen"`` (the module was not called with a tensor)
        or ``"unsupported"`` (this engine, the default, cannot cut)."""
        return self.jvp(tangents), "unsupported"

    def _record_rng(self, before: bool) -> None:
        devices = {p.device for p in self.params}
        if before:
            self._rng_before = RngSnapshot(devices)
        else:
            self._rng_after = RngSnapshot(devices)
            assert self._rng_before is not None
            self._rng_after.forget_unused(self._rng_before)

    def _scratch_buffers(self) -> list[torch.Tensor] | None:
        if self.tensors is None or not self.tensors.buffer_slots:
            return None
        return [b.clone() for b in self.tensors.current_buffers()]

    def rerun(self, params: Sequence[torch.Tensor] | None) -> torch.Tensor:
        """Run ``model_fn`` again with the randomness of the first pass.

        ``params`` (if given) replace the module's parameters; the module's
        buffers are replaced by throw-away copies, so running statistics are not
        touched. Requires a module.
        """
        assert self.tensors is not None and self._model_fn is not None
        assert self._rng_before is not None
        self._rng_before.restore()
        with self.tensors.substituted(params, self._scratch_buffers()):
            return check_predictions(self._model_fn())

    def evaluate(self) -> torch.Tensor:
        """Predictions on the same batch at the current parameters (buffers untouched).

        Without gradients, or, for a model function that differentiates the network
        with respect to its inputs, with gradients enabled and the parameters
        detached: graphs in the inputs only (see
        :mod:`~curveball._curvature.input_derivatives`). The result is detached.
        """
        self.current_pass = "the evaluation of the trust-region test"
        if not self.traits.input_derivatives:
            with torch.no_grad():
                return self._evaluated(None)
        detached = [p.detach() for p in self.params] if self.tensors is not None else None
        with torch.enable_grad(), InputDerivativeWatch(self.traits):
            return self._evaluated(detached).detach()

    def _evaluated(self, params: Sequence[torch.Tensor] | None) -> torch.Tensor:
        if self.tensors is not None:
            return self.rerun(params)
        assert self._model_fn is not None and self._rng_before is not None
        self._rng_before.restore()
        with buffers_kept():
            return check_predictions(self._model_fn())

    def abort(self) -> None:
        """Give up the current iteration: rewind the random generators to before it."""
        rng = self._rng_before
        self.finish()
        if rng is not None:
            rng.restore()

    def finish(self) -> None:
        """Free graphs and leave the random generators as the first pass left them."""
        if self._rng_after is not None:
            self._rng_after.restore()
        self._model_fn = None
        self._rng_before = self._rng_after = None
