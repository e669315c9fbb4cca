"""Curvature products: Jacobian-vector and vector-Jacobian products of a network.

Two interchangeable engines compute, at one point and on one batch,

* ``J v`` (a Jacobian-vector product, the tangent of the predictions) and
* ``Jᵀ u`` (a vector-Jacobian product, one backward pass),

from which the generalised Gauss-Newton product ``G v = Jᵀ H_L J v`` follows:

* :class:`~curveball.curvature.forward_mode.ForwardModeEngine` uses true
  forward-mode automatic differentiation (dual numbers): the forward pass that
  produces the predictions carries the tangent at the same time.
* :class:`~curveball.curvature.double_backward.DoubleBackwardEngine` obtains
  ``J v`` from a backward pass of a backward pass. It is slower (it builds and
  traverses the graph of a backward pass) and only a fallback for operations
  that lack forward-mode formulas, or for optimizers built from bare parameters
  (no module to substitute tensors in).
"""

from curveball.curvature.double_backward import DoubleBackwardEngine, DoubleBackwardUnsupported
from curveball.curvature.engine import JacobianEngine
from curveball.curvature.forward_mode import ForwardModeEngine, ForwardModeUnsupported
from curveball.curvature.ggn import ggn_vector_product

__all__ = [
    "DoubleBackwardEngine",
    "DoubleBackwardUnsupported",
    "ForwardModeEngine",
    "ForwardModeUnsupported",
    "JacobianEngine",
    "ggn_vector_product",
]
