"""Lean forward-mode rules for the layers that dominate a forward pass.

A CurveBall iteration runs two forward-mode passes. PyTorch's built-in
forward-mode formulas are general; for the layers below they do work that
this use makes unnecessary, and :class:`LeanTangents` (a
:class:`~torch.overrides.TorchFunctionMode` active only during those passes)
does it more cheaply, with identical results:

* Bilinear layers ``y = f(x, W) + b`` (``F.linear``, ``F.conv1d/2d/3d``) have
  the tangent ``ẏ = f(ẋ, W) + f(x, Ẇ) + ḃ``. The built-in formula evaluates both
  products even when the input carries no tangent, which is the case for every
  layer fed by the data (the first layer of almost every network): it then
  multiplies or convolves a tensor of zeros. Only the non-zero products are
  evaluated here, and without recording an autograd graph for the tangent
  (CurveBall never differentiates a tangent).
* Max pooling has the tangent ``ẋ`` gathered at the arg-max positions.
* Average pooling is linear: the tangent is the pooled ``ẋ``.
* Normalisation layers (``F.batch_norm``, ``F.layer_norm``, ``F.rms_norm``,
  ``F.group_norm``) whiten their input with statistics ``μ``, ``s = 1/σ`` over
  some dimensions: with ``x̂ = (x − μ) s`` the tangent is
  ``ẏ = γ s (ẋ − mean(ẋ) − x̂ mean(ẋ x̂)) + γ̇ x̂ + β̇`` (RMS norm without
  ``mean(ẋ)``; batch norm with running statistics without both means). The
  primal and its statistics come from one call of the fused kernel (which also
  updates batch norm's running statistics as usual; RMS norm computes its one
  statistic apart), instead of the built-in formula's recomputation of them
  (:mod:`~curveball._curvature.normalization_rule`).
* Scaled dot-product attention (``F.scaled_dot_product_attention``), whose
  fused kernels have no forward-mode formula, gets the closed-form tangent of
  :mod:`~curveball._curvature.attention_rule`. ``nn.MultiheadAttention``'s
  function is rebuilt from ``F.linear`` and ``F.scaled_dot_product_attention``
  (:mod:`~curveball._curvature.multi_head_rule`) while the mode is active, so
  that its projections and its attention get the rules here and replay too; a
  call that module does not accept (``need_weights=True``, ``bias_k``, zero
  attention, unbatched input) runs PyTorch's explicit path (the weights dropped
  if they were not asked for), whose inside the mode does not see and which has
  PyTorch's own forward-mode formulas. (While the mode is active, PyTorch's
  fused inference paths of ``nn.MultiheadAttention`` and
  ``nn.TransformerEncoderLayer`` are not taken, as for any tensor with a
  ``__torch_function__`` override.)
* Weight normalisation (``torch._weight_norm``, whose fused kernel has no
  forward-mode formula) is computed as ``g · v / ‖v‖`` from differentiable parts.
* LSTM and GRU layers (``torch.lstm``, ``torch.gru``) keep their own kernel for
  the primal values (for the LSTM on a CPU, oneDNN's fused one) and get the
  tangents of :mod:`~curveball._curvature.recurrent_rule`. Plain RNN layers
  (``torch.rnn_tanh``, ``torch.rnn_relu``), and the calls that rule leaves
  alone, run with oneDNN disabled: its float32 CPU kernel has no forward-mode
  formula, PyTorch's native one has.
* Inside a ``torch.no_grad()`` block of the model, every operation runs on
  the primal values alone: forward-mode AD ignores ``no_grad`` by itself, but
  the reverse-mode gradient (and so ``Δz``) treats such a block as constant,
  and both must differentiate the same function.

*Replay.* The second forward-mode pass of an iteration runs at the same
parameters, on the same batch and with the same random draws as the first, so
every layer's primal output equals the one the first pass computed. The first
pass records the primal outputs of the layers above (and the arg-max positions
of max pooling); the second pass reuses them and computes only tangents: no
primal product of a linear or convolution layer, no max-pooling search, no
normalisation statistics, no attention weights and no recurrent gates. A
record is only reused when the call matches it (same function, shapes, options,
weight and bias storage and version) and it was not modified in place since;
from the first mismatch on, layers are computed as usual. Replay therefore
changes the cost of the pass, never its result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from curveball._curvature import multi_head_rule
from curveball._curvature.attention_rule import (
    AttentionCall,
    attention_primal,
    attention_tangent,
)
from curveball._curvature.input_derivatives import (
    GRAD_FUNCTIONS,
    InputDerivativesSeen,
    differentiated,
)
from curveball._curvature.normalization_rule import NORMS, batch_norm_tangent
from curveball._curvature.recurrent_rule import (
    RecurrentCall,
    recurrent_primal,
    recurrent_tangent,
    unflatten,
)

_BILINEAR = frozenset({F.linear, F.conv1d, F.conv2d, F.conv3d})
_WITH_INDICES = (F.max_pool1d_with_indices, F.max_pool2d_with_indices, F.max_pool3d_with_indices)
# the pooling functions by number of pooled dimensions (``F.max_poolNd`` dispatches to the
# ``_with_indices`` variant when ``return_indices=True``; both are seen here)
_MAX_POOL = {
    **{f: d for d, f in enumerate((F.max_pool1d, F.max_pool2d, F.max_pool3d), start=1)},
    **{f: d for d, f in enumerate(_WITH_INDICES, start=1)},
}
_AVG_POOL = frozenset(
    {
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
    }
)
_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training",
                    "momentum", "eps")  # fmt: skip
_RETURN_INDICES = 6  # position of ``return_indices`` in F.max_poolNd's signature
_RECURRENT = frozenset({torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu})


@contextmanager
def _onednn_disabled() -> Iterator[None]:
    """oneDNN off for a block (``torch.backends.mkldnn.flags`` without its warnings)."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(enabled)


@dataclass
class Record:
    """One primal result of the recording pass."""

    key: tuple[Any, ...]
    tensors: tuple[torch.Tensor | None, ...]
    versions: tuple[int, ...]

    def valid(self) -> bool:
        return all(
            t is None or t._version == v for t, v in zip(self.tensors, self.versions, strict=True)
        )


def _plain(t: Any) -> bool:
    """A dense tensor or parameter (tensor subclasses are left to their own rules)."""
    return type(t) is torch.Tensor or type(t) is torch.nn.Parameter


def _storage_key(t: torch.Tensor | None) -> tuple[Any, ...] | None:
    return None if t is None else (t.data_ptr(), t._version, tuple(t.shape), t.dtype)


def _options_key(args: tuple, kwargs: dict) -> str:
    return repr(args) + repr(sorted(kwargs.items()))


class LeanTangents(TorchFunctionMode):
    """Forward-mode rules for the layers that dominate a pass (see the module doc).

    Args:
        level: the forward-AD level whose tangents are handled.
        replay: the :attr:`records` of an earlier pass at the same point and batch
            whose primal results may be reused, or ``None``.
        record: keep this pass's primal results in :attr:`records`.
        lean: apply the lean rules. ``False`` for a model function that
            differentiates the network with respect to its inputs
            (:mod:`~curveball._curvature.input_derivatives`): then only ``no_grad``
            blocks, weight normalisation and the recurrent kernels' choice are
            handled here, and every other function keeps PyTorch's formulas, whose
            backward graphs carry the parameters' tangents. With ``lean=True`` a call
            of ``torch.autograd.grad`` raises
            :class:`~curveball._curvature.input_derivatives.InputDerivativesSeen`.
    """

    def __init__(
        self,
        level: int,
        replay: list[Record] | None = None,
        record: bool = False,
        lean: bool = True,
    ) -> None:
        super().__init__()
        self.level = level
        self.lean = lean
        self.records: list[Record] = []
        self._record = record
        self._replay = replay
        self._position = 0

    # ---------------------------------------------------------------- replay
    def _reuse(self, key: tuple[Any, ...]) -> tuple[torch.Tensor, ...] | None:
        if self._replay is None:
            return None
        if self._position < len(self._replay):
            rec = self._replay[self._position]
            self._position += 1
            if rec.key == key and rec.valid():
                return rec.tensors
        self._replay = None  # out of step with the recording: compute from here on
        return None

    def _primal(self, key: tuple[Any, ...], compute: Callable[[], Any]) -> tuple[torch.Tensor, ...]:
        """The recorded results for ``key`` if replaying, else ``compute()``; kept if recording."""
        tensors = self._reuse(key)
        if tensors is None:
            out = compute()
            tensors = tuple(out) if isinstance(out, tuple) else (out,)
        if self._record:
            kept = tuple(None if t is None else t.detach() for t in tensors)
            versions = tuple(-1 if t is None else t._version for t in kept)
            self.records.append(Record(key, kept, versions))
        return tensors

    def _unpack(self, t: Any) -> tuple[Any, torch.Tensor | None]:
        if not _plain(t):
            return t, None
        unpacked = fwAD.unpack_dual(t, level=self.level)
        return unpacked.primal, unpacked.tangent

    def _primal_only(self, t: Any) -> Any:
        return fwAD.unpack_dual(t, level=self.level).primal if _plain(t) else t

    # ----------------------------------------------------------------- rules
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in GRAD_FUNCTIONS:
            if self.lean:
                raise InputDerivativesSeen(f"{func.__name__} called inside model_fn")
            return differentiated(func, args, kwargs)
        if not torch.is_grad_enabled():  # a no_grad block of the model: no tangents either
            return func(*tree_map(self._primal_only, args), **tree_map(self._primal_only, kwargs))
        out = self._lean_rule(func, args, kwargs) if self.lean else None
        if out is not None:
            return out
        if func is torch._weight_norm:
            v, g, *rest = (*args, *kwargs.values())
            dim = rest[0] if rest else 0
            return v * (g / torch.norm_except_dim(v, 2, dim))
        if func in _RECURRENT:
            with _onednn_disabled():
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _lean_rule(self, func, args: tuple, kwargs: dict):
        """The lean rule's result for this call, or ``None`` where none applies."""
        if func in _BILINEAR:
            return self._bilinear(func, args, kwargs)
        if func in _MAX_POOL:
            return self._max_pool(func, args, kwargs)
        if func in _AVG_POOL:
            return self._linear_pool(func, args, kwargs)
        if func is F.batch_norm:
            return self._batch_norm(args, kwargs)
        if func in NORMS:
            return self._norm(func, args, kwargs)
        if func is F.scaled_dot_product_attention:
            return self._attention(args, kwargs)
        if func is F.multi_head_attention_forward:
            return self._multi_head_attention(func, args, kwargs)
        if func in _RECURRENT:
            return self._recurrent(func, args, kwargs)
        return None

    def _bilinear(self, func, args: tuple, kwargs: dict):
        if len(args) < 2 or "input" in kwargs or "weight" in kwargs:
            return None  # unusual call: leave it to the built-in rule
        x, w = args[0], args[1]
        if len(args) > 2:
            b, rest = args[2], args[3:]
        else:
            b, rest = kwargs.get("bias"), ()
        rest_kwargs = {k: v for k, v in kwargs.items() if k != "bias"}
        if not (_plain(x) and _plain(w) and (b is None or _plain(b))):
            return None  # tensor subclasses keep their own rules
        xp, xt = self._unpack(x)
        wp, wt = self._unpack(w)
        bp, bt = self._unpack(b)
        if wt is None:  # frozen weight (rare): the built-in rule is fine
            return None
        key = (
            func,
            tuple(xp.shape),
            xp.dtype,
            _storage_key(wp),
            _storage_key(bp),
            _options_key(rest, rest_kwargs),
        )
        (primal,) = self._primal(key, lambda: func(xp, wp, bp, *rest, **rest_kwargs))
        with torch.no_grad():
            tangent = func(xp, wt, bt, *rest, **rest_kwargs)
            if xt is not None:
                tangent += func(xt, wp, None, *rest, **rest_kwargs)
        return fwAD.make_dual(primal, tangent, level=self.level)

    def _max_pool(self, func, args: tuple, kwargs: dict):
        if not args or "input" in kwargs:
            return None
        xp, xt = self._unpack(args[0])
        if xt is None:
            return None
        options, kw = list(args[1:]), dict(kwargs)
        if len(options) >= _RETURN_INDICES:
            return_indices = bool(options[_RETURN_INDICES - 1])
            del options[_RETURN_INDICES - 1 :]
        else:
            return_indices = bool(kw.pop("return_indices", False))
        return_indices = return_indices or func in _WITH_INDICES
        dims = _MAX_POOL[func]
        key = (dims, tuple(xp.shape), xp.dtype, _options_key(tuple(options), kw))
        primal, indices = self._primal(key, lambda: _WITH_INDICES[dims - 1](xp, *options, **kw))
        with torch.no_grad():
            tangent = xt.flatten(-dims).gather(-1, indices.flatten(-dims)).view(primal.shape)
        out = fwAD.make_dual(primal, tangent, level=self.level)
        return (out, indices) if return_indices else out

    def _linear_pool(self, func, args: tuple, kwargs: dict):
        if not args or "input" in kwargs:
            return None
        xp, xt = self._unpack(args[0])
        if xt is None:
            return None
        key = (func, tuple(xp.shape), xp.dtype, _options_key(args[1:], kwargs))
        (primal,) = self._primal(key, lambda: func(xp, *args[1:], **kwargs))
        with torch.no_grad():
            tangent = func(xt, *args[1:], **kwargs)
        return fwAD.make_dual(primal, tangent, level=self.level)

    def _batch_norm(self, args: tuple, kwargs: dict):
        if len(args) > len(_BATCH_NORM_ARGS) or set(kwargs) - set(_BATCH_NORM_ARGS):
            return None
        call = dict(zip(_BATCH_NORM_ARGS[: len(args)], args, strict=True)) | kwargs
        x, w, b = call.get("input"), call.get("weight"), call.get("bias")
        mean, var = call.get("running_mean"), call.get("running_var")
        training = bool(call.get("training", False))
        momentum, eps = call.get("momentum", 0.1), call.get("eps", 1e-5)
        if not all(t is None or _plain(t) for t in (x, w, b, mean, var)) or x is None:
            return None
        if x.dim() < 2 or (not training and (mean is None or var is None)):
            return None
        if any(self._unpack(t)[1] is not None for t in (mean, var) if t is not None):
            return None  # statistics with a tangent (not a module's buffers)
        (xp, xt), (wp, wt), (bp, bt) = (self._unpack(t) for t in (x, w, b))
        if xt is None and wt is None and bt is None:
            return None
        key = ("batch_norm", tuple(xp.shape), xp.dtype, _storage_key(wp), _storage_key(bp),
               training, momentum, eps)  # fmt: skip
        shape = (1, -1) + (1,) * (xp.dim() - 2)

        def primal():
            if training:
                out, mu, inv = torch.native_batch_norm(xp, wp, bp, mean, var, True, momentum, eps)
            else:
                out = F.batch_norm(xp, mean, var, wp, bp, False, momentum, eps)
                mu, inv = mean, torch.rsqrt(var + eps)
            mu, inv = mu.detach().to(xp.dtype).view(shape), inv.detach().to(xp.dtype).view(shape)
            return out, inv, xp.detach() - mu

        out, inv, centred = self._primal(key, primal)
        with torch.no_grad():
            tangent = batch_norm_tangent(
                xt, wt, bt, centred, inv, None if wp is None else wp.view(shape), training
            )
        return fwAD.make_dual(out, tangent, level=self.level)

    def _norm(self, func, args: tuple, kwargs: dict):
        """Layer, RMS and group normalisation (:mod:`~curveball._curvature.normalization_rule`)."""
        rule = NORMS[func]
        call = rule.bind(args, kwargs)
        if call is None:
            return None
        x, w, b = call["input"], call.get("weight"), call.get("bias")
        if not all(t is None or _plain(t) for t in (x, w, b)):
            return None
        (xp, xt), (wp, wt), (bp, bt) = (self._unpack(t) for t in (x, w, b))
        if (xt is None and wt is None and bt is None) or xp.dim() < 2 or xp.numel() == 0:
            return None
        option, eps = call[rule.names[1]], call.get("eps", rule.default_eps)
        key = (func, tuple(xp.shape), xp.dtype, _storage_key(wp), _storage_key(bp),
               repr(option), eps)  # fmt: skip
        out, normalized, inv = self._primal(key, lambda: rule.primal(xp, option, wp, bp, eps))
        with torch.no_grad():
            tangent = rule.tangent(xt, wt, bt, normalized, inv, wp, option, xp.shape)
        return fwAD.make_dual(out, tangent, level=self.level)

    def _attention(self, args: tuple, kwargs: dict):
        call = AttentionCall.bind(args, kwargs)
        if call is None or not all(_plain(t) for t in (call.query, call.key, call.value)):
            return None
        mask = call.attn_mask
        if mask is not None and not _plain(mask):
            return None
        (qp, qt), (kp, kt), (vp, vt) = (self._unpack(t) for t in (call.query, call.key, call.value))
        mp, mt = self._unpack(mask) if mask is not None else (None, None)
        if qt is None and kt is None and vt is None and mt is None:
            return None  # no tangent here: the fused kernels are fine
        key = (
            "attention",
            tuple(qp.shape),
            tuple(kp.shape),
            tuple(vp.shape),
            qp.dtype,
            None if mp is None else (tuple(mp.shape), mp.dtype),
            call.options(),
        )
        out, p, keep = self._primal(key, lambda: attention_primal(call, qp, kp, vp, mp))
        tangent = attention_tangent(call, (qp, kp, vp), (qt, kt, vt), mt, p, keep)
        return fwAD.make_dual(out, tangent, level=self.level)

    def _recurrent(self, func, args: tuple, kwargs: dict):
        bound = RecurrentCall.bind(func, args, kwargs)
        if bound is None:
            return None
        call, x, states, params = bound
        if not all(_plain(t) for t in (x, *states, *params)):
            return None
        xp, xt = self._unpack(x)
        state_pairs = [self._unpack(t) for t in states]
        weight_pairs = [self._unpack(w) for w in params]
        weights, weight_dots = [w for w, _ in weight_pairs], [t for _, t in weight_pairs]
        state_primals, state_dots = [p for p, _ in state_pairs], [t for _, t in state_pairs]
        if xt is None and all(t is None for t in (*state_dots, *weight_dots)):
            return None  # no tangent here: the fused kernel is fine
        key = ("recurrent", tuple(xp.shape), xp.dtype, tuple(state_primals[0].shape), call,
               tuple(_storage_key(w) for w in weights))  # fmt: skip
        primal = self._primal(key, lambda: recurrent_primal(call, xp, state_primals, weights))
        outs, flat = primal[: 1 + len(states)], primal[1 + len(states) :]
        tangents = recurrent_tangent(
            call, unflatten(call, tuple(flat)), xt, state_dots, weights, weight_dots
        )
        return tuple(  # (output, h_n, c_n) or (output, h_n), as the kernels return
            fwAD.make_dual(p, torch.empty_like(p).copy_(t), level=self.level)
            for p, t in zip(outs, tangents, strict=True)
        )

    def _multi_head_attention(self, func, args: tuple, kwargs: dict):
        call = multi_head_rule.bind(args, kwargs)
        if call is None or call["need_weights"]:
            return None  # PyTorch's explicit path (or its own error), with its own formulas
        if multi_head_rule.supported(call):
            with self:  # the mode sees the projections and the attention of this rebuilt call
                return multi_head_rule.multi_head_attention(call)
        out, _ = func(**{**call, "need_weights": True})  # the explicit path, weights dropped
        return out, None
