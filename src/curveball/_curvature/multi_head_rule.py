"""``nn.MultiheadAttention`` rebuilt from the calls the lean rules handle.

``F.multi_head_attention_forward`` is one overridable function: a
:class:`~torch.overrides.TorchFunctionMode` sees the call, but not the
projections and the attention inside it, so neither gets a lean rule nor
replays its primal results in the second forward-mode pass. For the common
call (batched input, no ``bias_k``/``bias_v``, no zero attention, no static
keys or values, ``need_weights=False``, as ``nn.TransformerEncoderLayer``,
``nn.TransformerDecoderLayer`` and most models make it), :func:`multi_head_attention`
computes the same function from parts the mode does see::

    q, k, v = x_q W_qᵀ + b_q,  x_k W_kᵀ + b_k,  x_v W_vᵀ + b_v   (F.linear)
    O_h     = attention(q_h, k_h, v_h, M)      (per head: F.scaled_dot_product_attention)
    y       = concat_h(O_h) W_oᵀ + b_o                           (F.linear)

with ``M`` the attention mask plus the key-padding mask, boolean masks
turned into ``0``/``−∞`` as PyTorch does (``True`` masks a position out), and
``is_causal`` applied exactly where PyTorch applies it: only without a key-padding
mask, in place of the attention mask. Its result equals PyTorch's up to rounding
(``tests/curvature/test_multi_head_rule.py``); :func:`supported` says which calls it
computes, and the others are left to PyTorch.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from curveball._curvature.attention_rule import additive_mask

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_UNSUPPORTED = ("bias_k", "bias_v", "static_k", "static_v")  # must be None


def bind(args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The call's arguments by name, or ``None`` if the signature does not bind."""
    try:
        bound = _SIGNATURE.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return bound.arguments


def supported(call: dict[str, Any]) -> bool:
    """Whether :func:`multi_head_attention` computes this call."""
    return (
        not call["need_weights"]
        and not call["add_zero_attn"]
        and all(call[name] is None for name in _UNSUPPORTED)
        and call["query"].dim() == 3
        and call["embed_dim_to_check"] == call["query"].shape[-1]
        and call["query"].shape[-1] % call["num_heads"] == 0
        and not (call["is_causal"] and call["attn_mask"] is None)  # PyTorch refuses it
        and (call["use_separate_proj_weight"] or call["in_proj_weight"] is not None)
    )


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``nn.MultiheadAttention``'s mask as an additive one (its boolean ``True`` masks out)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return additive_mask(~mask, dtype)  # the attention's convention: ``True`` attends


def _projections(call: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    query, key, value = call["query"], call["key"], call["value"]
    bias = call["in_proj_bias"]
    biases = (None, None, None) if bias is None else bias.chunk(3)
    if call["use_separate_proj_weight"]:
        weights = (call["q_proj_weight"], call["k_proj_weight"], call["v_proj_weight"])
    else:
        weights = call["in_proj_weight"].chunk(3)
        if query is key and key is value:  # self-attention: one product for all three
            return F.linear(query, call["in_proj_weight"], bias).chunk(3, dim=-1)
    return tuple(  # type: ignore[return-value]
        F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases, strict=True)
    )


def _mask(
    call: dict[str, Any], batch: int, heads: int, dtype: torch.dtype
) -> tuple[torch.Tensor | None, bool]:
    """``(mask, is_causal)`` for the attention of shape ``(batch, heads, L, S)``."""
    padding = _float_mask(call["key_padding_mask"], dtype)
    if call["is_causal"] and padding is None:
        return None, True
    mask = _float_mask(call["attn_mask"], dtype)
    if mask is not None and mask.dim() == 3:  # (batch · heads, L, S)
        mask = mask.view(batch, heads, *mask.shape[-2:])
    if padding is not None:  # (batch, S): the same keys masked for every query and head
        padding = padding.view(batch, 1, 1, padding.shape[-1])
        mask = padding if mask is None else mask + padding
    return mask, False


def multi_head_attention(call: dict[str, Any]) -> tuple[torch.Tensor, None]:
    """``(output, None)`` of a :func:`supported` call, from ``F.linear`` and
    ``F.scaled_dot_product_attention``; inputs are ``(L, N, E)`` as PyTorch's."""
    heads = call["num_heads"]
    length, batch, width = call["query"].shape
    q, k, v = _projections(call)

    def split(t: torch.Tensor) -> torch.Tensor:  # (L, N, E) -> (N, heads, L, E / heads)
        t = t.reshape(t.shape[0], batch, heads, width // heads).permute(1, 2, 0, 3)
        return t.contiguous()  # one copy here, instead of one in every product with it

    mask, causal = _mask(call, batch, heads, q.dtype)
    dropout = call["dropout_p"] if call["training"] else 0.0
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), mask, dropout, causal)
    out = out.permute(2, 0, 1, 3).reshape(length, batch, width)
    return F.linear(out, call["out_proj_weight"], call["out_proj_bias"]), None
