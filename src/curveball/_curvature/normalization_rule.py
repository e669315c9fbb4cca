"""Tangents of the normalisation layers from the statistics of their primal pass.

Every normalisation whitens its input over some dimensions: with the statistics
``μ`` and ``s = 1/σ`` of those dimensions, ``x̂ = (x − μ) s`` and ``y = γ x̂ + β``
(γ and β broadcast per channel or per element). The tangent is::

    ẏ = γ s (ẋ − mean(ẋ) − x̂ mean(ẋ x̂)) + γ̇ x̂ + β̇

with the means over the whitened dimensions; RMS normalisation (``μ = 0``,
``s = 1/√(mean(x²) + ε)``) drops the ``mean(ẋ)`` term, and batch normalisation
with running statistics (fixed ``μ`` and ``s``) drops both means. The primal
functions below compute the output with PyTorch's own kernel (so the primal,
and a recording pass's autograd graph, are exactly the built-in ones) and keep
what the tangent needs, which the second pass of a step replays; the tangent
functions need no statistics of their own.

Layers: ``F.batch_norm`` (statistics per channel), ``F.layer_norm`` and
``F.rms_norm`` (per sample, over the trailing ``normalized_shape``) and
``F.group_norm`` (per sample and group of channels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def batch_norm_tangent(xt, wt, bt, centred, inv, weight, training: bool) -> torch.Tensor:
    """``ẏ = A ẋ + B x̂ + C`` with per-channel ``A = γ s``, ``B = γ̇ − A mean(ẋ x̂)`` and
    ``C = β̇ − A mean(ẋ)`` (the means only with batch statistics), formed from the
    centred input ``x − μ`` in four passes over the activations."""
    shape = inv.shape
    a = inv if weight is None else inv * weight
    b = c = None
    if xt is not None and training:
        dims = [0, *range(2, xt.dim())]
        c = -a * xt.mean(dims, keepdim=True)
        b = -a * inv * (xt * centred).mean(dims, keepdim=True)
    if wt is not None:
        b = wt.view(shape) if b is None else b + wt.view(shape)
    if bt is not None:
        c = bt.view(shape) if c is None else c + bt.view(shape)
    tangent = torch.zeros_like(centred) if c is None else c.expand_as(centred).clone()
    if b is not None:
        tangent.addcmul_(b * inv, centred)
    if xt is not None:
        tangent.addcmul_(a, xt)
    return tangent


def _whitened_tangent(
    xt: torch.Tensor, normalized: torch.Tensor, inv: torch.Tensor, dims: list[int], centre: bool
) -> torch.Tensor:
    """``s (ẋ − mean(ẋ) − x̂ mean(ẋ x̂))`` over ``dims`` (without ``mean(ẋ)`` if not ``centre``)."""
    tangent = xt - normalized * (xt * normalized).mean(dims, keepdim=True)
    if centre:
        tangent -= xt.mean(dims, keepdim=True)
    return tangent.mul_(inv)


def _affine_tangent(
    tangent: torch.Tensor | None,
    normalized: torch.Tensor,
    weight: torch.Tensor | None,
    wt: torch.Tensor | None,
    bt: torch.Tensor | None,
) -> torch.Tensor:
    """``γ ṅ + γ̇ x̂ + β̇`` for the whitened tangent ``ṅ`` (``None``: zero); ``γ``, ``γ̇``
    and ``β̇`` already shaped to broadcast against ``x̂``."""
    if tangent is None:
        tangent = torch.zeros_like(normalized)
    elif weight is not None:
        tangent.mul_(weight)
    if wt is not None:
        tangent.addcmul_(wt, normalized)
    if bt is not None:
        tangent += bt
    return tangent


def _trailing(x: torch.Tensor, normalized_shape: Sequence[int]) -> list[int]:
    return list(range(x.dim() - len(normalized_shape), x.dim()))


def _layer_norm_primal(x, normalized_shape, weight, bias, eps):
    out, mean, inv = torch.native_layer_norm(x, tuple(normalized_shape), weight, bias, eps)
    with torch.no_grad():
        normalized = (x.detach() - mean.detach()) * inv.detach()
    return out, normalized, inv.detach()


def _rms_norm_primal(x, normalized_shape, weight, bias, eps):
    """``y`` from ``F.rms_norm`` itself, the statistics apart (``bias`` is always ``None``)."""
    normalized_shape = tuple(normalized_shape)
    out = F.rms_norm(x, normalized_shape, weight, eps)
    with torch.no_grad():
        xd = x.detach()
        eps = torch.finfo(xd.dtype).eps if eps is None else eps
        dims = _trailing(xd, normalized_shape)
        inv = torch.rsqrt(xd.pow(2).mean(dims, keepdim=True).add_(eps))
    return out, xd * inv, inv


def _trailing_tangent(centre: bool):
    """The tangent of a normalisation over the trailing ``normalized_shape`` (layer norm
    with ``centre``, RMS norm without)."""

    def tangent(xt, wt, bt, normalized, inv, weight, normalized_shape, shape):
        whitened = None
        if xt is not None:
            dims = _trailing(xt, normalized_shape)
            whitened = _whitened_tangent(xt, normalized, inv, dims, centre)
        return _affine_tangent(whitened, normalized, weight, wt, bt)

    return tangent


def _group_norm_primal(x, groups, weight, bias, eps):
    """``x̂`` and ``s`` laid out as ``(N, G, C/G · …)``."""
    n, c = x.shape[0], x.shape[1]
    groups = int(groups)
    out, mean, inv = torch.native_group_norm(x, weight, bias, n, c, x[0, 0].numel(), groups, eps)
    with torch.no_grad():
        grouped = x.detach().reshape(n, groups, -1)
        inv = inv.detach().unsqueeze(-1)
        normalized = (grouped - mean.detach().unsqueeze(-1)) * inv
    return out, normalized, inv


def _group_norm_tangent(xt, wt, bt, normalized, inv, weight, groups, shape):
    whitened = None
    if xt is not None:
        whitened = _whitened_tangent(xt.reshape(normalized.shape), normalized, inv, [-1], True)
        whitened = whitened.view(shape)
    channel = (1, -1) + (1,) * (len(shape) - 2)
    return _affine_tangent(
        whitened,
        normalized.view(shape),
        None if weight is None else weight.view(channel),
        None if wt is None else wt.view(channel),
        None if bt is None else bt.view(channel),
    )


@dataclass(frozen=True)
class NormRule:
    """One per-sample normalisation: its argument names and its two halves.

    ``primal(x, option, γ, β, ε)`` returns ``(y, x̂, s)`` (``option``: the
    ``normalized_shape`` or the number of groups); ``tangent(ẋ, γ̇, β̇, x̂, s, γ,
    option, shape)`` returns ``ẏ`` for an input of ``shape`` (``None`` tangents are
    zero).
    """

    names: tuple[str, ...]
    primal: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    tangent: Callable[..., torch.Tensor]
    default_eps: float | None = 1e-5

    def bind(self, args: tuple, kwargs: dict) -> dict | None:
        """The call's arguments by name, or ``None`` for a call this rule leaves alone."""
        if len(args) > len(self.names) or set(kwargs) - set(self.names):
            return None
        call = dict(zip(self.names[: len(args)], args, strict=False)) | kwargs
        if "input" not in call or self.names[1] not in call:
            return None
        if self.names[1] == "normalized_shape" and isinstance(call["normalized_shape"], int):
            return None  # PyTorch refuses it: let it say so
        return call


NORMS = {
    F.layer_norm: NormRule(("input", "normalized_shape", "weight", "bias", "eps"),
                           _layer_norm_primal, _trailing_tangent(centre=True)),
    F.rms_norm: NormRule(("input", "normalized_shape", "weight", "eps"),
                         _rms_norm_primal, _trailing_tangent(centre=False), None),
    F.group_norm: NormRule(("input", "num_groups", "weight", "bias", "eps"),
                           _group_norm_primal, _group_norm_tangent),
}  # fmt: skip
"""The rules by function."""
