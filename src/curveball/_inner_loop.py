"""The inner loop of the full-batch regime: several iterations on one quadratic model.

On a mini-batch, CurveBall improves ``z`` by one step per parameter update: the
next batch brings another model anyway (Henriques et al., ICCV 2019). When the
same batch comes every step (physics-informed networks on fixed collocation
points, full-batch regression), the model of a step can be solved further
before the parameters move: ``inner_steps`` iterations at the same ``w``, each

    z_{i+1} = ρ z_i − β d_i                        (``solver="curveball"``: span{z, d})
    z_{i+1} = z_i + ρ (z_i − z_{i−1}) − β d_i      (``solver="conjugate"``, i ≥ 1)

with ``d_i = P Δz_i`` and ``Δz_i = (G + λI) z_i + g`` the model's (preconditioned)
gradient, and ρ, β the exact minimiser of the model over the plane (the 2×2 solve
of :mod:`curveball._quadratic_model`). The first iteration is the paper's step.
Over ``z_i + span{z_i − z_{i−1}, d_i}`` the planar minimisation is the conjugate
gradient method on the damped Gauss-Newton system (preconditioned by the fixed
``P``: the preconditioner's average is not updated inside the loop). ``J`` is
linear, so ``J z_{i+1}`` follows from ``J z_i``, ``J d_i`` and ``J z_{i−1}`` without
a pass: each further iteration costs one backward pass through the retained graph
of the step's first pass (``Δz``) and one forward-mode pass (``J d``), the cost of a
Gauss-Newton-vector product.

An iteration that cannot be taken (a non-finite value, no descent direction) ends
the loop: the parameters then move along the last finite ``z``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from curveball._curvature.engine import JacobianEngine
from curveball._layout import Layout
from curveball._plan import Plan
from curveball._preconditioner import divide_
from curveball._products import Batch, Products, backward
from curveball._step_info import StepInfo
from curveball._update import step_z_


def next_z(engine: JacobianEngine, products: Products, info: StepInfo, layout: Layout,
           plan: Plan, batch: Batch, conjugate: bool) -> Products:  # fmt: skip
    """Take the inner step ``info`` describes (``z`` in place, ``J z`` by linearity), then
    form ``Δz``, ``d`` and ``J d`` at the new ``z``."""
    zs = layout.zs
    assert zs is not None and products.jdz is not None
    previous = [z.clone() for z in zs] if conjugate else None
    step_z_(zs, products.dz, info.rho, info.beta, products.previous_step)
    jd = products.jdz if products.dz_scale == 1.0 else products.jdz / products.dz_scale
    jz = products.jz * info.rho - jd * info.beta
    if products.j_previous_step is not None:  # z + ρ p − β d: J z + ρ J p − β J d
        jz = products.jz + products.j_previous_step * info.rho - jd * info.beta
    loss = products.loss
    h_jz = loss.hvp(jz)
    dz = backward(engine, products.predictions, h_jz + loss.grad.detach(), layout, plan, batch,
                  keep_graph=True)  # fmt: skip
    out = Products(products.predictions, loss, dz, jz, h_jz, averages=products.averages)
    if products.denominators is not None:  # the preconditioner P stays fixed in the loop
        divide_(dz, products.denominators)
        out.denominators = products.denominators
    elif products.raw is not None:  # the dense or the Nyström one
        assert layout.curvature_inverse is not None
        out.raw, out.damping = [t.clone() for t in dz], products.damping
        torch._foreach_copy_(dz, layout.curvature_inverse.apply(dz, products.damping))
    if conjugate:
        assert previous is not None
        out.previous_step = torch._foreach_sub(list(zs), previous)
        out.j_previous_step = jz - products.jz
    out.set_direction(engine.jvp(dz), None)
    return out


def iterate(
    engine: JacobianEngine,
    first: Products,
    info: StepInfo,
    decide: Callable[[Products], StepInfo],
    layout: Layout,
    plan: Plan,
    batch: Batch,
) -> tuple[Products, StepInfo]:
    """Iterations 2 to ``plan.inner_steps`` after the first (``first``, ``info``).

    Returns the products and the decision of the last iteration that can be taken; its
    update (by the caller) gives the final ``z``. ``info.predicted_change`` is then the
    model's change from ``z = 0`` to that ``z``; ``info.inner_steps`` counts the
    iterations. Should an iteration raise, ``z`` is put back as it was before the first.
    """
    zs = layout.zs
    assert zs is not None
    conjugate = plan.solver == "conjugate"
    products, start = first, [z.clone() for z in zs]
    value, done = 0.0, 1  # M at the start of the current iteration; iterations decided
    try:
        for _ in range(1, plan.inner_steps):
            if info.skipped or not info.refreshed:
                break
            relative = conjugate and done > 1  # a conjugate iteration's change is from its start
            end = value + info.predicted_change if relative else info.predicted_change
            here = [z.clone() for z in zs]
            candidate = next_z(engine, products, info, layout, plan, batch, conjugate)
            following = decide(candidate)
            if following.skipped:  # stay with the last iteration that could be taken
                torch._foreach_copy_(zs, here)
                break
            products, info, value, done = candidate, following, end, done + 1
    except BaseException:
        torch._foreach_copy_(zs, start)
        raise
    if conjugate and done > 1:
        info = replace(info, predicted_change=value + info.predicted_change)
    return products, replace(info, inner_steps=done)
