"""The forward-mode rule of scaled dot-product attention.

``F.scaled_dot_product_attention`` dispatches to fused kernels (flash and
memory-efficient attention) that have neither a forward-mode formula nor a
differentiable backward pass. Softmax attention has a closed-form tangent::

    S = s Q Kᵀ + M            (s the scale, M the additive or boolean mask, causal or not)
    P = softmax(S)            (row-wise; fully masked rows give zeros)
    O = (D ⊙ P) V             (D the dropout keep-mask divided by 1 − p, or 1)

    Ṡ = s (Q̇ Kᵀ + Q K̇ᵀ) + Ṁ
    Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ))
    Ȯ = (D ⊙ Ṗ) V + (D ⊙ P) V̇

:func:`attention_primal` computes ``O`` on the explicit path (``S`` and ``P``
are materialised, as PyTorch's math backend does; it is differentiable, so the
backward pass of the first forward-mode pass runs through it) and returns ``P``
and ``D`` with it; :func:`attention_tangent` computes ``Ȯ`` from them without
recomputing the primal, so the second pass of a step replays ``P`` and ``D``.
The dropout mask is drawn from PyTorch's generator, which the optimizer rewinds
between the passes of a step, so every pass uses the same mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_FIELDS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass(frozen=True)
class AttentionCall:
    """The arguments of one ``F.scaled_dot_product_attention`` call, by name."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None = None
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False

    @staticmethod
    def bind(args: tuple, kwargs: dict) -> AttentionCall | None:
        """The call's arguments, or ``None`` for a signature this rule does not know."""
        if len(args) > len(_FIELDS) or any(name not in _FIELDS for name in kwargs):
            return None
        values = dict(zip(_FIELDS, args, strict=False))
        if any(name in values for name in kwargs):
            return None
        values.update(kwargs)
        if not all(name in values for name in _FIELDS[:3]):
            return None
        return AttentionCall(**values)

    def options(self) -> tuple:
        """What, besides the tensors' values, determines the result."""
        return (float(self.dropout_p), bool(self.is_causal), self.scale, bool(self.enable_gqa))


def _repeat_heads(t: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """Grouped-query attention: each key/value head serves ``groups`` query heads."""
    if t is None or groups == 1:
        return t
    return t.repeat_interleave(groups, dim=-3)


def _head_groups(call: AttentionCall, query: torch.Tensor, key: torch.Tensor) -> int:
    if not call.enable_gqa or query.dim() < 3:
        return 1
    return query.size(-3) // key.size(-3)


def _scale(call: AttentionCall, query: torch.Tensor) -> float:
    return call.scale if call.scale is not None else 1.0 / math.sqrt(query.size(-1))


def _causal_mask(s: torch.Tensor) -> torch.Tensor:
    """``0`` on and below the diagonal of the last two dimensions, ``−∞`` above it."""
    rows, cols = s.shape[-2:]
    return torch.full((rows, cols), -math.inf, dtype=s.dtype, device=s.device).triu_(1)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (``True``: attend) as ``0``/``−∞``; an additive one as it is."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


def _broadcasts(mask: torch.Tensor, s: torch.Tensor) -> bool:
    """Whether ``s + mask`` has the shape of ``s`` (so ``s`` can take it in place)."""
    return torch.broadcast_shapes(mask.shape, s.shape) == s.shape


def attention_primal(
    call: AttentionCall,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
):
    """``(O, P, D)`` on the explicit path; ``D`` is ``None`` without dropout.

    As ``F.scaled_dot_product_attention`` does, dropout applies whenever
    ``dropout_p`` is positive (modules pass 0 in evaluation mode).
    """
    groups = _head_groups(call, q, k)
    k, v = _repeat_heads(k, groups), _repeat_heads(v, groups)
    # in place: neither the product's nor the scaling's backward needs s, nor an addition's
    s = (q @ k.transpose(-2, -1)).mul_(_scale(call, q))
    if call.is_causal:
        s = s.add_(_causal_mask(s))
    if mask is not None:
        additive = additive_mask(mask, s.dtype)
        s = s.add_(additive) if _broadcasts(additive, s) else s + additive
    p = torch.softmax(s, dim=-1)
    if mask is not None:  # a fully masked row attends to nothing, as PyTorch's own kernels do
        p = torch.nan_to_num(p, nan=0.0)  # (a causal mask alone leaves every row a key)
    keep = None
    if call.dropout_p > 0.0:
        keep = torch.empty_like(p).bernoulli_(1.0 - call.dropout_p).div_(1.0 - call.dropout_p)
    out = (p if keep is None else p * keep) @ v
    return out, p.detach(), keep


@torch.no_grad()
def attention_tangent(
    call: AttentionCall,
    primals: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    tangents: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    mask_tangent: torch.Tensor | None,
    p: torch.Tensor,
    keep: torch.Tensor | None,
) -> torch.Tensor:
    """``Ȯ`` from the primal inputs, their tangents (``None`` = zero), ``P`` and ``D``."""
    q, k, v = primals
    qt, kt, vt = tangents
    groups = _head_groups(call, q, k)
    k, v = _repeat_heads(k, groups), _repeat_heads(v, groups)
    kt, vt = _repeat_heads(kt, groups), _repeat_heads(vt, groups)
    s_dot = None
    if qt is not None:
        s_dot = qt @ k.transpose(-2, -1)
    if kt is not None:
        term = q @ kt.transpose(-2, -1)
        s_dot = term if s_dot is None else s_dot.add_(term)
    if s_dot is not None:
        s_dot.mul_(_scale(call, q))
    if mask_tangent is not None:
        s_dot = mask_tangent.expand(p.shape) if s_dot is None else s_dot.add_(mask_tangent)
    out = None
    if s_dot is not None:
        p_dot = p * s_dot
        p_dot = p_dot.sub_(p * p_dot.sum(dim=-1, keepdim=True))
        if keep is not None:
            p_dot.mul_(keep)
        out = p_dot @ v
    if vt is not None:
        term = (p if keep is None else p * keep) @ vt
        out = term if out is None else out.add_(term)
    assert out is not None
    return out
