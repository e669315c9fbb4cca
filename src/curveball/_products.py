"""The curvature products of a step: its automatic-differentiation passes and their results.

On one batch and at the current parameters ``w`` (Henriques et al., ICCV 2019,
section 3, steps 1–4):

    y, J z  ← one forward-mode pass with the tangent z
    J_L, H_L J z  ← the loss's derivatives at y (closed form or autograd)
    Δz = Jᵀ(H_L J z + J_L) + κ w + (λ + κ) z  ← one backward pass, averaged over processes
    d = Δz / (√v' + ε)  ← the diagonal preconditioner (if on; else d = Δz)
    J d, H_L J d  ← a second forward-mode pass (when ρ and β are solved for)

:class:`Products` keeps these and forms the network-side terms of the 2×2
system. The second pass can run on a leading part of the batch (a curvature
mini-batch, ``curvature_fraction``), and ``J d`` can be recomputed for a
rescaled ``d`` when ``H_L J d`` overflows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from curveball._curvature.engine import JacobianEngine
from curveball._curvature.jacobian_matrix import JacobianMatrixEngine
from curveball._curvature.loss_derivatives import LossDerivatives
from curveball._curvature.row_subset import leading_rows
from curveball._distributed import Averager
from curveball._gauss_newton import DenseInverse, gauss_newton
from curveball._layout import Layout
from curveball._nystrom import NystromInverse, sketch
from curveball._param_vectors import dot
from curveball._plan import Plan
from curveball._preconditioner import multiplied, precondition_
from curveball._step_scalars import StepScalars
from curveball.pointwise import PointwiseResidual

PHASES = (
    "curveball: pass 1 (y, Jz)",
    "curveball: loss derivatives",
    "curveball: backward (dz)",
    "curveball: pass 2 (J dz)",
    "curveball: scalars and solve",
    "curveball: update",
    "curveball: trust-region test",
    "curveball: preconditioner",
    "curveball: inner iterations",
)
"""The labels of a step's stages in ``torch.profiler`` traces: the first seven in the order
they run, then the preconditioner (between the backward pass and the second pass) and the
inner iterations after the first (which hold their own scalars and solves)."""


_profiling: Callable[[], bool] = getattr(torch.autograd, "_profiler_enabled", lambda: True)
"""Whether a profiler records (a PyTorch without this query: always labelled)."""


def phase(index: int) -> AbstractContextManager[Any]:
    """The label ``PHASES[index]`` around a stage while a profiler records; nothing
    otherwise (a label costs about 14 µs on a CPU, and a step has seven to nine)."""
    if _profiling():
        return torch.profiler.record_function(PHASES[index])
    return nullcontext()


NOT_CUT = {
    "unsupported": (
        "CurveBall: curvature_fraction applies to forward-mode AD only; this step ran on "
        "the double-backward path, where J Δz is computed on the whole batch"
    ),
    "unseen": (
        "CurveBall: curvature_fraction could not cut the batch, because model_fn did not "
        "call the module given to CurveBall with a tensor argument; J Δz is computed on the "
        "whole batch. Call the module itself in model_fn (model(x), not model.forward(x) "
        "or its submodules)"
    ),
}
"""Warnings for a curvature mini-batch that could not be cut (a batch too small to cut
needs none: its J Δz is exact)."""

NO_FUNCTIONS = (
    "CurveBall.step(model_fn, loss_fn): both are needed, since CurveBall runs its "
    "own forward-mode and backward passes (a closure that calls backward() cannot "
    "give it the curvature). With PyTorch Lightning use manual optimization and "
    "call self.optimizers().step(model_fn=..., loss_fn=...); with the Hugging Face "
    "Trainer use curveball.integrations.transformers.CurveBallTrainer."
)
"""The error of a step without ``model_fn`` and ``loss_fn``."""

Warn = Callable[[str, str], None]  # (kind, message), given once per kind


@dataclass
class Products:
    """The results of a step's AD passes."""

    predictions: torch.Tensor
    loss: LossDerivatives
    dz: list[torch.Tensor]
    jz: torch.Tensor
    h_jz: torch.Tensor
    jdz: torch.Tensor | None = None  # with H_L JΔz, only when ρ and β are solved for
    h_jdz: torch.Tensor | None = None
    dz_scale: float = 1.0  # jdz and h_jdz belong to dz_scale · Δz
    rows: int | None = None  # jdz holds J Δz on these leading rows only (zeros below)
    averages: list[torch.Tensor] | None = None  # the preconditioner's v after this step
    denominators: list[torch.Tensor] | None = None  # its √v + ε: d = Δz / (√v + ε)
    # an inner iteration along conjugate directions: the previous inner step p = z − z_prev
    # and J p take the place of z and J z in the 2×2 system (see _inner_loop)
    previous_step: list[torch.Tensor] | None = None
    j_previous_step: torch.Tensor | None = None
    raw: list[torch.Tensor] | None = None  # Δz before a dense preconditioner
    damping: float = 0.0  # the damping of a dense preconditioner: d = (G + damping·I)⁻¹ Δz

    @property
    def jp(self) -> torch.Tensor:
        """``J`` of the second direction of the plane: ``J z``, or ``J p`` (conjugate)."""
        return self.jz if self.j_previous_step is None else self.j_previous_step

    def set_direction(self, jdz: torch.Tensor, rows: int | None) -> None:
        """Keep ``JΔz`` (on the first ``rows`` rows of the predictions only, if given:
        a curvature mini-batch) and ``H_L JΔz``."""
        if rows is not None:
            padded = torch.zeros_like(self.jz)
            padded[:rows] = jdz
            jdz = padded
        self.jdz, self.rows = jdz, rows
        self.h_jdz = self.loss.hvp(jdz)

    def curvature(self, precise: bool) -> dict[str, torch.Tensor] | None:
        """The network-side terms of the 2×2 system (float64 accumulation if ``precise``).

        On a curvature mini-batch of ``r`` of the ``n`` rows, the three curvature
        terms are the mini-batch's, times ``n / r`` (unbiased for a loss that is a
        sum or mean over rows, as every one of :mod:`curveball.losses` is), and
        ``J_Lᵀ(JΔz)`` is that estimate too; the quadratic model then takes ``gᵀΔz``
        from the exact identity instead (``groups["raw_dz"]``).
        """
        if self.jdz is None or self.h_jdz is None:
            return None
        j_loss = self.loss.grad.detach()
        n = self.jz.shape[0]
        r = n if self.rows is None else self.rows
        # on the whole batch: weight 1 and c a power of two, so the scaling is exact
        weight, c = n / r, self.dz_scale
        jz, jdz, h_jdz = self.jp[:r], self.jdz[:r], self.h_jdz[:r]
        h_jz = self.h_jz if self.j_previous_step is None else self.loss.hvp(self.jp)
        return {
            "jdz_h_jdz": dot(jdz, h_jdz, precise) * (weight / (c * c)),
            "jz_h_jdz": dot(jz, h_jdz, precise) * (weight / c),
            "jz_h_jz": dot(jz, h_jz[:r], precise) * weight,
            "jl_jdz": dot(j_loss[:r], jdz, precise) * (weight / c),
            "jl_jz": dot(j_loss, self.jp, precise),
        }

    def rescale_dz(
        self,
        directional: Callable[[list[torch.Tensor]], tuple[torch.Tensor, int | None]],
        dz_dz: Sequence[float],
    ) -> None:
        """``J(cΔz)`` and ``H_L J(cΔz)`` with ``c`` a power of two making ``‖cΔz‖ ≈ 1``.

        ``Δz`` grows with the loss's scale and ``H_L JΔz`` with its square, which
        leaves float32's range for losses near 1e20; the method itself is
        invariant to that scale.
        """
        norm = math.sqrt(sum(v for v in dz_dz if math.isfinite(v)) or 1.0)
        self.dz_scale = 2.0 ** -round(math.log2(norm)) if math.isfinite(norm) else 1.0
        self.set_direction(*directional(torch._foreach_mul(self.dz, self.dz_scale)))

    def unpreconditioned(self) -> list[torch.Tensor]:
        """``Δz`` before the preconditioner (from ``d = Δz / (√v' + ε)`` for the diagonal)."""
        if self.raw is not None:
            return self.raw
        if self.denominators is None:
            return self.dz
        return multiplied(self.dz, self.denominators)


@dataclass(frozen=True)
class Batch:
    """What the passes of a step need besides the engine: the user's functions and values
    of the optimizer (the groups' weight decays, the process group, the loss's convexity)."""

    model_fn: Callable[[], torch.Tensor]
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    weight_decays: tuple[float, ...]
    averager: Averager
    psd_loss: bool
    warn: Warn

    @staticmethod
    def of(
        model_fn: Any,
        loss_fn: Any,
        groups: list[dict],
        psd_loss: bool,
        averager: Averager,
        warn: Warn,
    ) -> Batch:
        """The step's batch, after checking that both functions were given (CurveBall runs
        its own passes: it cannot work from a closure alone)."""
        if model_fn is None or loss_fn is None:
            raise TypeError(NO_FUNCTIONS)
        for name, fn in (("model_fn", model_fn), ("loss_fn", loss_fn)):
            if not callable(fn):
                raise TypeError(f"{name}: expected a callable, got {type(fn).__name__}")
        decays = tuple(group["weight_decay"] for group in groups)
        return Batch(model_fn, loss_fn, decays, averager, psd_loss, warn)


def compute(engine: JacobianEngine, batch: Batch, layout: Layout, plan: Plan) -> Products:
    """The AD passes: ``y, Jz`` → ``J_L, H_L Jz`` → ``Δz`` → (``JΔz``, ``H_L JΔz``)."""
    zs = layout.zs
    assert zs is not None
    # a curvature mini-batch runs the second pass afresh: nothing to keep for it
    replayed = plan.refresh and not _cut(layout, plan)
    with phase(0):
        y, jz = engine.linearize(batch.model_fn, zs, jvp_follows=replayed)
    with phase(1):
        psd = batch.psd_loss and LossDerivatives.can_clamp(y)
        loss = LossDerivatives(batch.loss_fn, y, psd=psd, upcast=plan.loss_scale is not None)
        j_loss = loss.grad.detach()
        h_jz = loss.hvp(jz)
    with phase(2):
        keep = plan.inner_steps > 1 or plan.inverse is not None  # more backward passes follow
        dz = backward(engine, y, h_jz + j_loss, layout, plan, batch, keep_graph=keep)
    products = Products(y, loss, dz, jz, h_jz)
    with phase(7):
        _precondition(engine, layout, loss, plan, batch, products)
    if plan.refresh:
        with phase(3):
            products.set_direction(*directional(engine, layout, plan, batch.warn, y.shape, dz))
    return products


def _precondition(
    engine: JacobianEngine,
    layout: Layout,
    loss: LossDerivatives,
    plan: Plan,
    batch: Batch,
    products: Products,
) -> None:
    """``products.dz`` becomes the direction ``d = P Δz`` of the step's preconditioner, if any
    (the diagonal one, or the dense or Nyström inverse, formed on its schedule)."""
    dz = products.dz
    if plan.precondition is not None:
        assert layout.averages is not None
        products.averages, products.denominators = precondition_(
            dz, layout.averages, *plan.precondition, layout.workspace
        )
    elif plan.inverse is not None:
        if plan.new_inverse or layout.curvature_inverse is None:
            layout.curvature_inverse = curvature_inverse(engine, layout, loss, plan, batch)
        products.damping = plan.lambd + min(batch.weight_decays)
        products.raw = [t.clone() for t in dz]
        torch._foreach_copy_(dz, layout.curvature_inverse.apply(dz, products.damping))


def curvature_inverse(
    engine: JacobianEngine, layout: Layout, loss: LossDerivatives, plan: Plan, batch: Batch
) -> DenseInverse | NystromInverse:
    """The dense (:mod:`curveball._gauss_newton`) or the Nyström
    (:mod:`curveball._nystrom`) preconditioner at this point, its matrix averaged over
    processes (every process then takes the same steps)."""
    if plan.inverse == "gauss-newton":
        model_fn, jac = batch.model_fn, None
        if isinstance(engine, JacobianMatrixEngine):  # J is at hand
            jac = engine.matrix
        elif isinstance(model_fn, PointwiseResidual):
            jac = model_fn.jacobian(layout.params)
        matrix = gauss_newton(engine, layout.params, loss, jac)[0]
        batch.averager.mean_([matrix])
        return DenseInverse(matrix)

    def product(v: list[torch.Tensor]) -> list[torch.Tensor]:
        return engine.vjp(loss.hvp(engine.jvp(v)), keep_graph=True)

    columns_product = None
    if isinstance(engine, JacobianMatrixEngine):  # J is at hand: Jᵀ H_L (J Ω) at once
        jac = engine.matrix
        assert jac is not None
        columns_product = lambda omega: jac.T @ loss.hvp_columns(jac @ omega)  # noqa: E731
    omega, images = sketch(product, layout.params, plan.rank, columns_product=columns_product)
    batch.averager.mean_([images])
    return NystromInverse(omega, images)


def backward(
    engine: JacobianEngine,
    y: torch.Tensor,
    cotangent: torch.Tensor,
    layout: Layout,
    plan: Plan,
    batch: Batch,
    keep_graph: bool = False,
) -> list[torch.Tensor]:
    """``Δz = Jᵀ(H_L J z + J_L) + κ w + (λ + κ) z``, averaged over processes."""
    zs = layout.zs
    assert zs is not None
    if plan.loss_scale is None:
        dz = engine.vjp(cotangent, keep_graph)
    else:  # float16: a scaled backward pass, unscaled exactly (a power of two)
        dz = engine.vjp((cotangent * plan.loss_scale).to(y.dtype), keep_graph)
        torch._foreach_mul_(dz, 1.0 / plan.loss_scale)
    layout.vectors.mean_(dz, batch.averager)
    for index, decay in enumerate(batch.weight_decays):
        factor = plan.lambd + decay
        if layout.members[index] and decay > 0:
            weights = [p.detach() for p in layout.in_group(index, layout.params)]
            torch._foreach_add_(layout.in_group(index, dz), weights, alpha=decay)
        if layout.members[index] and factor != 0.0:
            torch._foreach_add_(
                layout.in_group(index, dz), layout.in_group(index, zs), alpha=factor
            )
    return dz


def _cut(layout: Layout, plan: Plan) -> bool:
    """Whether the second pass runs on a curvature mini-batch."""
    return plan.minibatch and not layout.whole_batch_jvp


def directional(
    engine: JacobianEngine,
    layout: Layout,
    plan: Plan,
    warn: Warn,
    shape: torch.Size,
    dz: list[torch.Tensor],
) -> tuple[torch.Tensor, int | None]:
    """``JΔz``, on a curvature mini-batch if one is asked for: then with the number of
    leading rows of the predictions that it holds (``None``: the whole batch)."""
    if not _cut(layout, plan):
        return engine.jvp(dz), None
    fraction = plan.curvature_fraction
    jdz, outcome = engine.jvp_leading_rows(dz, fraction)
    if outcome != "cut":
        if outcome in NOT_CUT:
            warn(f"whole batch: {outcome}", NOT_CUT[outcome])
        return jdz, None  # computed on the whole batch: exact
    rows = leading_rows(shape, jdz.shape)
    if rows is None or rows == shape[0]:  # all n rows from a cut batch: not rows of it
        layout.whole_batch_jvp = True
        warn(
            "whole batch: shape",
            f"CurveBall: curvature_fraction={fraction} cut the batch along the first "
            f"dimension of the model's arguments, but the predictions came out shaped "
            f"{tuple(jdz.shape)} instead of leading rows of {tuple(shape)} (the batch is "
            "not their first dimension); J Δz is computed on the whole batch from now on",
        )
        return engine.jvp(dz), None
    return jdz, rows


def read_scalars(
    engine: JacobianEngine, products: Products, layout: Layout, plan: Plan, batch: Batch
) -> StepScalars:
    """Every scalar the step needs, on the host in one transfer.

    The inner products accumulate in the parameters' precision (float32 at
    least). Should one overflow (a loss near 1e20 in float32 has squared norms
    beyond float32's range), they are formed again in float64, and ``JΔz`` for a
    rescaled ``Δz`` if that is still not enough: one or two more host
    transfers (and a forward-mode pass) on such a step only, no cost on others.
    """
    dz, zs = products.dz, layout.zs
    assert zs is not None
    pairs = {"dz_dz": (dz, dz)}
    if plan.refresh and products.previous_step is not None:  # conjugate directions
        p, raw = products.previous_step, products.unpreconditioned()
        pairs.update(z_dz=(p, dz), z_z=(p, p), raw_dz=(raw, dz), raw_z=(raw, p))
    elif plan.refresh:
        pairs.update(z_dz=(zs, dz), z_z=(zs, zs))
        if products.rows is not None:
            pairs["raw_dz"] = (products.unpreconditioned(), dz)
        if any(decay > 0 for decay in batch.weight_decays):
            weights = [p.detach() for p in layout.params]
            pairs.update(w_dz=(weights, dz), w_z=(weights, zs))
    scalars = _gather(products, layout, pairs, batch.averager, precise=False)
    if _overflowed(scalars):
        scalars = _gather(products, layout, pairs, batch.averager, precise=True)
        if _overflowed(scalars) and plan.refresh:
            # H_L JΔz itself overflowed: redo it for a rescaled Δz
            products.rescale_dz(
                lambda t: directional(engine, layout, plan, batch.warn, products.jz.shape, t),
                scalars.groups["dz_dz"],
            )
            scalars = _gather(products, layout, pairs, batch.averager, precise=True)
    return scalars


def _gather(
    products: Products, layout: Layout, pairs: dict, averager: Averager, precise: bool
) -> StepScalars:
    dots = layout.vectors.group_dots(list(pairs.values()), precise)
    return StepScalars.read(
        products.loss.loss,
        products.predictions,
        products.curvature(precise),
        dict(zip(pairs, dots, strict=True)),
        averager,
    )


def _overflowed(scalars: StepScalars) -> bool:
    """Whether an inner product is non-finite although the loss and predictions are finite."""
    finite_inputs = math.isfinite(scalars.loss) and scalars.predictions_finite
    return finite_inputs and not all(math.isfinite(v) for v in scalars.values())
