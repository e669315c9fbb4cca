"""Residuals written point by point, and their Jacobian by per-point reverse mode.

A physics-informed network's loss is ``L = ½‖r‖²`` with ``r`` the residuals of the
equation and of its boundary conditions at collocation points. Each residual depends
on the parameters θ through the network *at one point* (and its derivatives in that
point), so the Jacobian ``J = ∂r/∂θ`` can be formed one row at a time: one
reverse-mode pass per point, batched over the points with ``torch.func.vmap``. That
costs about as much as a few passes over the whole batch, against ``D`` passes
(forward mode, one column of ``J`` each) when the library sees only the batched
residual vector — the way energy natural gradient descent forms its Gramian
(Müller & Zeinhofer, "Achieving high accuracy with PINNs via energy natural gradient
descent", ICML 2023).

:class:`PointwiseResidual` is a ``model_fn`` for :meth:`curveball.CurveBall.step`
that carries this structure. Called, it returns the residual vector; where CurveBall
forms the dense Gauss-Newton matrix (``precondition="gauss-newton"``, or ``"auto"``
on small models: :mod:`curveball._gauss_newton`) it takes ``J`` from
:meth:`PointwiseResidual.jacobian` instead of ``D`` forward-mode passes. Every
other product of a step is unchanged, so the step is the same as with the batched
residual, only cheaper.

Each term is a function ``fn(u, x)`` of the network at one point, ``u(x)`` (the
module applied to ``x[None]``, its batch dimension removed), and of the point
``x``; it may differentiate ``u`` with ``torch.func`` (``jacrev``, ``jacfwd``,
``hessian``, nested). Example, Poisson's equation ``−Δu = f`` with ``u = g`` on
the boundary::

    def interior(u, x):
        return -torch.func.hessian(lambda y: u(y).squeeze())(x).trace() - f(x)

    def boundary(u, x):
        return u(x).squeeze() - g(x)

    residual = PointwiseResidual(
        model, [Term(interior, x_in, n_in**-0.5), Term(boundary, x_bd, n_bd**-0.5)]
    )
    opt.step(residual, lambda r: 0.5 * r.square().sum())
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

JACOBIAN_CHUNK = 1 << 22
"""The per-point passes of :meth:`PointwiseResidual.linearize` run in batches of
``JACOBIAN_CHUNK // D`` points (``D`` parameters), all at once where a term has fewer: a
smaller working set for a large network (on the PINN race's 10,065-parameter network, 416
points a batch make a step about a fifth cheaper than one batch of its 3,500 points; see
the changelog), a single batch for networks of a few hundred parameters. Each batch writes
its rows, scaled, straight into ``J``, allocated once (and kept from step to step by the
engine, see the changelog) rather than concatenated from copies."""

PointFunction = Callable[[torch.Tensor], torch.Tensor]
"""The network at one point: ``u(x)`` for ``x`` of the shape of one row of a term's points."""


@dataclass(frozen=True)
class Term:
    """One block of the residual vector: ``scale · fn(u, xₙ)`` for every point ``xₙ``.

    Args:
        fn: the residual at one point, ``fn(u, x)``; any shape (flattened into ``r``).
        points: the points, one per row (their first dimension).
        scale: a factor on the block (``1/√Nₜ`` makes ``½‖r‖²`` a mean over the points).
    """

    fn: Callable[[PointFunction, torch.Tensor], torch.Tensor]
    points: torch.Tensor
    scale: float = 1.0


class PointwiseResidual:
    """The residual vector ``r = concat_t(scale_t · fn_t(u, xₜₙ))``, in the order of the
    terms, then of their points, then of each point's residual entries.

    Args:
        model: the network; ``u(x)`` is ``model(x[None])[0]``.
        terms: the blocks of ``r`` (:class:`Term`, or ``(fn, points[, scale])`` tuples).

    Raises:
        TypeError: if a term is not a :class:`Term` or a tuple of two or three items, or
            its function is not callable or its points are not a tensor.
        ValueError: if there is no term, or a term has no point.
    """

    def __init__(self, model: nn.Module, terms: Sequence[Term | tuple]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.model = model
        self.terms = [_term(t, i) for i, t in enumerate(terms)]
        if not self.terms:
            raise ValueError("terms: a residual needs at least one term")

    def __call__(self) -> torch.Tensor:
        """``r`` at the module's current parameters (differentiable in them)."""

        def u(x: torch.Tensor) -> torch.Tensor:
            return self.model(x.unsqueeze(0)).squeeze(0)

        parts = []
        for term in self.terms:
            values = vmap(lambda x, fn=term.fn: fn(u, x))(term.points)
            parts.append(values.reshape(-1) * term.scale)
        return torch.cat(parts)

    def jacobian(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """``J = ∂r/∂θ`` (the residuals × the entries of ``params``, flattened and
        concatenated in their order; float64) at the parameters' current values, one
        reverse-mode pass per point (``vmap`` of ``jacrev``). Other parameters and the
        buffers of the module are held fixed.

        Raises:
            ValueError: if a parameter is not registered in the module, or is complex.
        """
        return self.linearize(params)[1]

    def linearize(
        self, params: Sequence[torch.Tensor], out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r, J)``: the residuals (detached) and :meth:`jacobian`, from the same passes.

        Args:
            params: the parameters (columns of ``J``), as for :meth:`jacobian`.
            out: scratch memory for ``J``, reused where it is a float64 tensor on the
                parameters' device with at least as many entries (``J`` is then a view
                of it): a step that forms ``J`` anew in fresh memory pays for the pages
                of a matrix of hundreds of megabytes being mapped, every step.
        """
        names = _names(self.model, params)
        primals = tuple(p.detach() for p in params)

        def point(values: tuple[torch.Tensor, ...], x: torch.Tensor, fn):
            weights = dict(zip(names, values, strict=True))

            def u(y: torch.Tensor) -> torch.Tensor:
                return functional_call(self.model, weights, (y.unsqueeze(0),)).squeeze(0)

            out = fn(u, x).reshape(-1)
            return out, out

        size = sum(p.numel() for p in primals)
        chunk = max(1, JACOBIAN_CHUNK // max(size, 1))  # points per batched pass
        per_point = vmap(jacrev(point, has_aux=True), in_dims=(None, 0, None))
        # The first batch of every term gives the term's residual width, so that J is
        # allocated once and every batch writes its rows into it: no copy of J.
        firsts = [per_point(primals, t.points[:chunk], t.fn) for t in self.terms]
        widths = [values.shape[1] for _, values in firsts]
        total = sum(len(t.points) * w for t, w in zip(self.terms, widths, strict=True))
        if (
            out is None
            or out.dtype != torch.float64
            or out.device != primals[0].device
            or out.numel() < total * size
        ):
            out = primals[0].new_empty(total * size, dtype=torch.float64)
        out = out.reshape(-1)[: total * size].view(total, size)
        dtype = functools.reduce(torch.promote_types, (values.dtype for _, values in firsts))
        values_out = primals[0].new_empty(total, dtype=dtype)
        row = 0
        for term, first in zip(self.terms, firsts, strict=True):
            for start in range(0, len(term.points), chunk):
                rows, values = (
                    first
                    if start == 0
                    else per_point(primals, term.points[start : start + chunk], term.fn)
                )  # rows: (n, m, *shape) each
                span = slice(row, row + values.numel())
                column = 0
                for block in rows:
                    flat = block.detach().reshape(values.numel(), -1)
                    width = flat.shape[1]
                    torch.mul(flat, term.scale, out=out[span, column : column + width])
                    column += width
                torch.mul(values.reshape(-1).detach(), term.scale, out=values_out[span])
                row = span.stop
        return values_out, out

    def size(self) -> int:
        """The number of points (the residual has at least this many entries)."""
        return sum(len(term.points) for term in self.terms)


def _term(term: Term | tuple, index: int) -> Term:
    if not isinstance(term, Term):
        if not isinstance(term, tuple) or len(term) not in (2, 3):
            raise TypeError(
                f"terms[{index}]: expected a Term or a tuple (fn, points[, scale]), "
                f"got {type(term).__name__}"
            )
        term = Term(*term)
    if not callable(term.fn):
        raise TypeError(f"terms[{index}]: fn must be callable, got {type(term.fn).__name__}")
    if not isinstance(term.points, torch.Tensor):
        raise TypeError(
            f"terms[{index}]: points must be a tensor, got {type(term.points).__name__}"
        )
    if term.points.dim() == 0 or len(term.points) == 0:
        raise ValueError(f"terms[{index}]: points must hold at least one point (one per row)")
    return term


def _names(model: nn.Module, params: Sequence[torch.Tensor]) -> list[str]:
    """The names in ``model`` of ``params``."""
    owned = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    names = []
    for i, p in enumerate(params):
        if id(p) not in owned:
            raise ValueError(
                f"params[{i}] is not a parameter of the residual's model: give the "
                "PointwiseResidual the module the optimizer trains"
            )
        if p.is_complex():
            raise ValueError(
                f"params[{i}] is complex: PointwiseResidual.jacobian forms real Jacobians "
                "only (use the batched residual, or store the weight as two real tensors)"
            )
        names.append(owned[id(p)])
    return names
