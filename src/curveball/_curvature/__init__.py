"""Curvature products: Jacobian-vector and vector-Jacobian products of a network.

Two interchangeable engines compute, at one point and on one batch,

* ``J v`` (a Jacobian-vector product, the tangent of the predictions) and
* ``Jᵀ u`` (a vector-Jacobian product, one backward pass),

from which the generalised Gauss-Newton product ``G v = Jᵀ H_L J v`` follows
(with ``H_L`` from :mod:`~curveball._curvature.loss_derivatives`):

* :mod:`~curveball._curvature.forward_mode` uses true forward-mode automatic
  differentiation (dual numbers), with the lean rules of
  :mod:`~curveball._curvature.lean_rules`;
* :mod:`~curveball._curvature.double_backward` obtains ``J v`` from a backward
  pass of a backward pass: slower, the fallback.

:mod:`~curveball._curvature.engine_choice` picks one and decides the fallback;
:mod:`~curveball._curvature.module_tensors` swaps dual tensors into the module.
"""
