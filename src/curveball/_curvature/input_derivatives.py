"""Model functions that differentiate the network with respect to its inputs.

A physics-informed network's residual contains derivatives of the network in its
inputs (``Δu``, ``∂ₜu``, ``∇ₓD(x)``), taken inside ``model_fn`` either with
``torch.autograd.grad(..., create_graph=True)`` or with ``torch.func``
transforms. Forward-mode AD handles both: the parameters' tangents flow through
the backward graph that ``autograd.grad`` builds (forward-over-reverse), so
``J v`` is the directional derivative of the residual itself. Three things need
care, and this module holds what they share:

* the lean rules of :mod:`~curveball._curvature.lean_rules` compute a layer's
  primal from the parameters' primal values and add the tangent apart, so the
  backward graph that ``autograd.grad`` then builds through that layer does not
  carry the tangent of its weights. A pass that sees ``torch.autograd.grad``
  while the lean rules are on raises :class:`InputDerivativesSeen`; the pass is
  run again with PyTorch's own forward-mode formulas (no lean rules, no replay)
  and the model is marked in :class:`ModelTraits` for the rest of the run;
* the evaluation of the trust-region test cannot run the user's code under
  ``torch.no_grad()`` (``autograd.grad`` needs a graph in the inputs): for such a
  model it runs with gradients enabled and the parameters detached, so that
  graphs in the inputs are recorded and none in the parameters;
* a derivative asked for with respect to a tensor that does not require
  gradients (collocation points created without ``requires_grad=True``) gets an
  error that says so, instead of autograd's "element 0 of tensors does not
  require grad".

``torch.func`` transforms (``vmap``, ``jacrev``) wrap their tensors, which the
lean rules leave to PyTorch's formulas, and need nothing of the above, except the
forward-mode ones (``jacfwd``, ``hessian``): dual tensors cannot be nested in
them, so such a model's passes run as ``torch.func.jvp`` of the module's function
of its parameters (``ModelTraits.nested_forward``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

GRAD_FUNCTIONS = frozenset({torch.autograd.grad, torch.autograd.backward})
"""The functions through which a model function differentiates inside itself."""


class InputDerivativesSeen(Exception):
    """A pass met input derivatives that its way of running cannot carry (lean rules under
    ``torch.autograd.grad``, dual tensors under ``torch.func.jacfwd``): run it again.

    Deliberately not a ``RuntimeError``: it must never be mistaken for a failure of
    forward mode (which would fall back to double backward).
    """


@dataclass
class ModelTraits:
    """What the passes learned about ``model_fn``, shared by the engines of a step.

    Attributes:
        input_derivatives: ``model_fn`` calls ``torch.autograd.grad`` (or
            ``backward``) itself: no lean rules, and evaluations without a
            parameter graph instead of under ``torch.no_grad()``.
        nested_forward: ``model_fn`` runs forward-mode transforms itself
            (``torch.func.jacfwd``, ``hessian``), inside which dual tensors cannot
            be nested: the forward-mode passes run as ``torch.func.jvp``.
    """

    input_derivatives: bool = False
    nested_forward: bool = False


def _inputs(func: Callable, args: tuple, kwargs: dict) -> list[Any]:
    if func is torch.autograd.grad:
        inputs = kwargs.get("inputs", args[1] if len(args) > 1 else None)
    else:
        inputs = kwargs.get("inputs")
    if inputs is None:
        return []
    return [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)


def check_inputs(func: Callable, args: tuple, kwargs: dict) -> None:
    """A clear error for a derivative with respect to a tensor without ``requires_grad``."""
    for index, t in enumerate(_inputs(func, args, kwargs)):
        if isinstance(t, torch.Tensor) and not t.requires_grad:
            raise ValueError(
                f"model_fn: {func.__module__}.{func.__name__} is asked for derivatives with "
                f"respect to inputs[{index}] (a tensor of shape {tuple(t.shape)}) that does "
                "not require grad; create the points where input derivatives are taken with "
                "requires_grad=True (x = x.detach().requires_grad_()) before calling the "
                "optimizer"
            )


def differentiated(func: Callable, args: tuple, kwargs: dict) -> Any:
    """``func(*args, **kwargs)`` for one of :data:`GRAD_FUNCTIONS`, its inputs checked."""
    check_inputs(func, args, kwargs)
    return func(*args, **kwargs)


class InputDerivativeWatch(TorchFunctionMode):
    """Notes in ``traits`` when the code it runs calls ``torch.autograd.grad`` (and checks
    the call); every other function runs unchanged."""

    def __init__(self, traits: ModelTraits) -> None:
        super().__init__()
        self.traits = traits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in GRAD_FUNCTIONS:
            self.traits.input_derivatives = True
            return differentiated(func, args, kwargs)
        return func(*args, **kwargs)
