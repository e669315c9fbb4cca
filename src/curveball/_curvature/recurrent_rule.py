"""The forward-mode rule of the LSTM layer (``torch.lstm``, what ``nn.LSTM`` calls).

PyTorch's fused CPU kernel (oneDNN) has no forward-mode formula; the native
kernel has one, but it runs the unfused cell step by step for the primal values
and the tangents together, and its backward pass records a graph of every step.
This rule keeps the fused kernel for the primal values (so the backward pass of
the first forward-mode pass runs through the fused kernel's backward) and
computes the tangent from them. With gates ``i, f, g, o`` (PyTorch's order) of
the pre-activations ``a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh``::

    c_t = f ⊙ c_{t-1} + i ⊙ g,        h_t = o ⊙ tanh(c_t)

    ȧ_t = P_t + W_hh ḣ_{t-1},         P_t = Ẇ_ih x_t + W_ih ẋ_t + Ẇ_hh h_{t-1} + ḃ_ih + ḃ_hh
    ċ_t = ḟ ⊙ c_{t-1} + f ⊙ ċ_{t-1} + i̇ ⊙ g + i ⊙ ġ
    ḣ_t = ȯ ⊙ tanh(c_t) + o ⊙ (1 − tanh²(c_t)) ⊙ ċ_t

with ``i̇ = i(1 − i) ȧ_i``, ``ḟ = f(1 − f) ȧ_f``, ``ġ = (1 − g²) ȧ_g``, ``ȯ = o(1 − o) ȧ_o``.
Every term that does not involve ``ḣ_{t-1}`` is formed for all steps at once
(``P`` by three batched products, the gates from the known outputs ``h_{t-1}``);
only ``W_hh ḣ_{t-1}`` and four element-wise operations remain in the loop over
time. :func:`lstm_primal` returns the primal results and what the tangent needs
(which the second pass of a step replays); :func:`lstm_tangent` computes the
tangents from them.

Supported: the unpacked call (``batch_first`` or not) of any number of layers,
with or without biases, with an initial state or without. Bidirectional layers,
projections (``proj_size``), packed sequences and dropout between layers in
training keep the native kernel and its built-in formula.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

_ARGS = ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train",
         "bidirectional", "batch_first")  # fmt: skip


@dataclass(frozen=True)
class LstmCall:
    """The options of one supported ``torch.lstm`` call (its tensors are passed apart)."""

    has_biases: bool
    num_layers: int
    train: bool
    batch_first: bool

    @property
    def per_layer(self) -> int:
        return 4 if self.has_biases else 2

    @staticmethod
    def bind(args: tuple, kwargs: dict) -> tuple[LstmCall, torch.Tensor, list, list] | None:
        """``(call, input, [h0, c0], params)``, or ``None`` for a call this rule leaves alone."""
        if kwargs or len(args) != len(_ARGS):
            return None
        x, hx, params, has_biases, layers, dropout, train, bidirectional, batch_first = args
        if not isinstance(x, torch.Tensor) or not isinstance(hx, list | tuple) or len(hx) != 2:
            return None  # the packed-sequence variant passes batch sizes second
        call = LstmCall(bool(has_biases), int(layers), bool(train), bool(batch_first))
        if bidirectional or (dropout and train and layers > 1) or x.dim() != 3:
            return None
        if len(params) != call.per_layer * call.num_layers:
            return None  # projections add a weight per layer
        return call, x, list(hx), list(params)


@dataclass
class LayerRecord:
    """What the tangent of one layer needs, all in time-major layout ``(T, B, ·)``."""

    inputs: torch.Tensor  # x_t
    previous: torch.Tensor  # h_{t-1}
    gate_factors: torch.Tensor  # [i(1-i) g, f(1-f) c_{t-1}, (1-g²) i, o(1-o) tanh c_t]
    forget: torch.Tensor  # f
    cell_factor: torch.Tensor  # o (1 - tanh² c_t)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    @staticmethod
    def unflatten(flat: tuple) -> list[LayerRecord]:
        """The records of :func:`lstm_primal`'s flat output, layer by layer."""
        size = len(fields(LayerRecord))
        return [LayerRecord(*flat[k : k + size]) for k in range(0, len(flat), size)]


def _time_major(t: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return t.transpose(0, 1) if batch_first else t


def _layer_record(
    x: torch.Tensor, out: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, weights: list
) -> LayerRecord:
    """The gates, recomputed from the known outputs in batched products, and the cells.

    ``tanh(a) = 2σ(2a) − 1`` and ``1 − tanh²(a) = 4σ(2a)(1 − σ(2a))`` let one sigmoid
    and one product give every gate and its derivative.
    """
    steps, batch, hidden = out.shape
    w_ih, w_hh = weights[0], weights[1]
    previous = torch.cat([h0.unsqueeze(0), out[:-1]])
    bias = weights[2] + weights[3] if len(weights) == 4 else None
    pre = (
        torch.matmul(x, w_ih.t())
        if bias is None
        else torch.addmm(bias, x.reshape(-1, x.size(-1)), w_ih.t()).view(steps, batch, -1)
    )
    pre.view(-1, 4 * hidden).addmm_(previous.reshape(-1, hidden), w_hh.t())
    blocks = pre.view(steps, batch, 4, hidden)
    blocks[:, :, 2].mul_(2.0)
    act = pre.sigmoid_()
    slopes = torch.addcmul(act, act, act, value=-1.0)  # σ(1 − σ)
    slopes.view(steps, batch, 4, hidden)[:, :, 2].mul_(4.0)
    blocks[:, :, 2].mul_(2.0).sub_(1.0)  # g = tanh
    i, f, g, o = act.chunk(4, dim=-1)
    cells = torch.empty(steps + 1, batch, hidden, dtype=out.dtype, device=out.device)
    cells[0] = c0
    ig = i * g
    for t in range(steps):
        torch.addcmul(ig[t], f[t], cells[t], out=cells[t + 1])
    tanh_c = cells[1:].tanh()
    factors = slopes.mul_(torch.cat([g, cells[:-1], i, tanh_c], dim=-1))
    cell_factor = torch.addcmul(o, o * tanh_c, tanh_c, value=-1.0)  # o (1 − tanh² c)
    return LayerRecord(x, previous, factors, f, cell_factor)


def lstm_primal(
    call: LstmCall, x: torch.Tensor, hx: list, params: list
) -> tuple[torch.Tensor, ...]:
    """``(output, h_n, c_n, *records)``: the fused kernel, layer by layer, then each layer's
    :class:`LayerRecord` flattened (:meth:`LayerRecord.unflatten` undoes it).

    The outputs keep their autograd graph; the records are detached.
    """
    h0, c0 = hx
    outs, hs, cs, records = [], [], [], []
    layer_input = x
    for layer in range(call.num_layers):
        weights = params[layer * call.per_layer : (layer + 1) * call.per_layer]
        state = (h0[layer : layer + 1], c0[layer : layer + 1])
        out, h_n, c_n = torch.lstm(layer_input, state, weights, call.has_biases, 1, 0.0,
                                   call.train, False, call.batch_first)  # fmt: skip
        with torch.no_grad():
            records.append(
                _layer_record(
                    _time_major(layer_input.detach(), call.batch_first),
                    _time_major(out.detach(), call.batch_first),
                    h0[layer].detach(),
                    c0[layer].detach(),
                    [w.detach() for w in weights],
                )
            )
        outs.append(out)
        hs.append(h_n)
        cs.append(c_n)
        layer_input = out
    flat = tuple(t for record in records for t in record.tensors())
    return (outs[-1], torch.cat(hs), torch.cat(cs), *flat)


def _input_products(
    record: LayerRecord, x_dot: torch.Tensor | None, weights: list, tangents: list
) -> torch.Tensor:
    """``P_t`` for every step at once (zeros where nothing carries a tangent)."""
    w_ih = weights[0]
    w_ih_dot, w_hh_dot, *bias_dots = tangents
    products = None
    for left, right in ((record.inputs, w_ih_dot), (x_dot, w_ih), (record.previous, w_hh_dot)):
        if left is not None and right is not None:
            term = torch.matmul(left, right.t())
            products = term if products is None else products.add_(term)
    if products is None:
        products = record.gate_factors.new_zeros(record.gate_factors.shape)
    for b in bias_dots:
        if b is not None:
            products += b
    return products


@torch.no_grad()
def lstm_tangent(
    call: LstmCall,
    records: list[LayerRecord],
    x_dot: torch.Tensor | None,
    hx_dot: list,
    params: list,
    param_dots: list,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tangents of ``(output, h_n, c_n)`` (``None`` tangents are zero)."""
    h0_dot, c0_dot = hx_dot
    layer_dot = None if x_dot is None else _time_major(x_dot, call.batch_first)
    h_dots, c_dots = [], []
    for layer, record in enumerate(records):
        span = slice(layer * call.per_layer, (layer + 1) * call.per_layer)
        weights = [w.detach() for w in params[span]]
        products = _input_products(record, layer_dot, weights, param_dots[span])
        w_hh_t = weights[1].t()
        hidden = record.previous.size(-1)
        h_dot = None if h0_dot is None else h0_dot[layer]
        c_dot = None if c0_dot is None else c0_dot[layer]
        outs = torch.empty_like(record.previous)
        steps = zip(products, record.gate_factors, record.forget, record.cell_factor, outs,
                    strict=True)  # fmt: skip
        for product, factor, forget, cell_factor, out in steps:
            pre_dot = product if h_dot is None else torch.addmm(product, h_dot, w_hh_t)
            gates = pre_dot.mul_(factor).view(*pre_dot.shape[:-1], 4, hidden)
            new_c = gates[..., :3, :].sum(-2)
            if c_dot is not None:
                new_c.addcmul_(forget, c_dot)
            h_dot = torch.addcmul(gates[..., 3, :], cell_factor, new_c, out=out)
            c_dot = new_c
        h_dots.append(h_dot)
        c_dots.append(c_dot)
        layer_dot = outs
    assert layer_dot is not None
    out_dot = layer_dot.transpose(0, 1) if call.batch_first else layer_dot
    return out_dot, torch.stack(h_dots), torch.stack(c_dots)
