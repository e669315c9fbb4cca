"""The forward-mode rules of the LSTM and GRU layers (``torch.lstm``, ``torch.gru``).

PyTorch's fused CPU kernels (oneDNN) have no forward-mode formula; the native
kernels have one, but they run the unfused cell step by step for the primal
values and the tangents together, and their backward pass records a graph of
every step. These rules keep the fused kernel for the primal values (so the
backward pass of the first forward-mode pass runs through the fused kernel's
backward) and compute the tangents from them.

LSTM, gates ``i, f, g, o`` (PyTorch's order) of the pre-activations
``a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh``::

    c_t = f ⊙ c_{t-1} + i ⊙ g,        h_t = o ⊙ tanh(c_t)

    ȧ_t = P_t + W_hh ḣ_{t-1},         P_t = Ẇ_ih x_t + W_ih ẋ_t + Ẇ_hh h_{t-1} + ḃ_ih + ḃ_hh
    ċ_t = ḟ ⊙ c_{t-1} + f ⊙ ċ_{t-1} + i̇ ⊙ g + i ⊙ ġ
    ḣ_t = ȯ ⊙ tanh(c_t) + o ⊙ (1 − tanh²(c_t)) ⊙ ċ_t

with ``i̇ = i(1 − i) ȧ_i``, ``ḟ = f(1 − f) ȧ_f``, ``ġ = (1 − g²) ȧ_g``, ``ȯ = o(1 − o) ȧ_o``.

GRU, gates ``r, z, n`` with ``u = W_ih x_t + b_ih`` and ``v = W_hh h_{t-1} + b_hh``::

    r = σ(u_r + v_r),  z = σ(u_z + v_z),  n = tanh(u_n + r ⊙ v_n),  h_t = (1 − z) ⊙ n + z ⊙ h_{t-1}

    v̇ = Q_t + W_hh ḣ_{t-1},           Q_t = Ẇ_hh h_{t-1} + ḃ_hh
    ṙ = r(1 − r)(u̇_r + v̇_r),  ż = z(1 − z)(u̇_z + v̇_z),  ṅ = (1 − n²)(u̇_n + ṙ ⊙ v_n + r ⊙ v̇_n)
    ḣ_t = ż ⊙ (h_{t-1} − n) + (1 − z) ⊙ ṅ + z ⊙ ḣ_{t-1}

with ``u̇ = Ẇ_ih x_t + W_ih ẋ_t + ḃ_ih``. In both, every term that does not
involve ``ḣ_{t-1}`` is formed for all steps at once (the input products by
batched matrix products, the gates from the known outputs ``h_{t-1}``); only
``W_hh ḣ_{t-1}`` and a few element-wise operations remain in the loop over
time. :func:`recurrent_primal` returns the primal results and what the tangent
needs (which the second pass of a step replays); :func:`recurrent_tangent`
computes the tangents from them.

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
class RecurrentCall:
    """The options of one supported ``torch.lstm`` or ``torch.gru`` call."""

    lstm: bool  # else GRU
    has_biases: bool
    num_layers: int
    train: bool
    batch_first: bool

    @property
    def per_layer(self) -> int:
        return 4 if self.has_biases else 2

    @staticmethod
    def bind(
        func, args: tuple, kwargs: dict
    ) -> tuple[RecurrentCall, torch.Tensor, list, list] | None:
        """``(call, input, initial states, params)``, or ``None`` for a call this rule leaves
        alone (the states: ``[h0, c0]`` for an LSTM, ``[h0]`` for a GRU)."""
        if kwargs or len(args) != len(_ARGS) or func not in (torch.lstm, torch.gru):
            return None
        x, hx, params, has_biases, layers, dropout, train, bidirectional, batch_first = args
        if not isinstance(x, torch.Tensor) or not isinstance(params, list | tuple):
            return None  # the packed-sequence variant passes batch sizes second
        lstm = func is torch.lstm
        states = list(hx) if lstm and isinstance(hx, list | tuple) else [hx]
        if len(states) != (2 if lstm else 1) or not all(
            isinstance(s, torch.Tensor) for s in states
        ):
            return None
        call = RecurrentCall(lstm, bool(has_biases), int(layers), bool(train), bool(batch_first))
        if bidirectional or (dropout and train and layers > 1) or x.dim() != 3:
            return None
        if len(params) != call.per_layer * call.num_layers:
            return None  # projections add a weight per layer
        return call, x, states, list(params)


@dataclass
class LstmRecord:
    """What the tangent of one LSTM layer needs, in time-major layout ``(T, B, ·)``."""

    inputs: torch.Tensor  # x_t
    previous: torch.Tensor  # h_{t-1}
    gate_factors: torch.Tensor  # [i(1-i) g, f(1-f) c_{t-1}, (1-g²) i, o(1-o) tanh c_t]
    forget: torch.Tensor  # f
    cell_factor: torch.Tensor  # o (1 - tanh² c_t)


@dataclass
class GruRecord:
    """What the tangent of one GRU layer needs, in time-major layout ``(T, B, ·)``."""

    inputs: torch.Tensor  # x_t
    previous: torch.Tensor  # h_{t-1}
    reset_factor: torch.Tensor  # r(1-r) v_n
    update_factor: torch.Tensor  # z(1-z) (h_{t-1} - n)
    new_factor: torch.Tensor  # (1-z)(1-n²)
    reset: torch.Tensor  # r
    update: torch.Tensor  # z


def _flatten(records: list) -> tuple[torch.Tensor, ...]:
    return tuple(getattr(r, f.name) for r in records for f in fields(r))


def unflatten(call: RecurrentCall, flat: tuple) -> list:
    """The per-layer records of :func:`recurrent_primal`'s flat output."""
    kind = LstmRecord if call.lstm else GruRecord
    size = len(fields(kind))
    return [kind(*flat[k : k + size]) for k in range(0, len(flat), size)]


def _time_major(t: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return t.transpose(0, 1) if batch_first else t


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x Wᵀ + b`` over the last dimension of a ``(T, B, ·)`` tensor."""
    flat = x.reshape(-1, x.size(-1))
    out = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
    return out.view(*x.shape[:-1], -1)


def _lstm_record(x, out, states, weights) -> LstmRecord:
    """The gates, recomputed from the known outputs in batched products, and the cells.

    ``tanh(a) = 2σ(2a) − 1`` and ``1 − tanh²(a) = 4σ(2a)(1 − σ(2a))`` let one sigmoid
    and one product give every gate and its derivative.
    """
    (h0, c0), (steps, batch, hidden) = states, out.shape
    previous = torch.cat([h0.unsqueeze(0), out[:-1]])
    bias = weights[2] + weights[3] if len(weights) == 4 else None
    pre = _affine(x, weights[0], bias)
    pre.view(-1, 4 * hidden).addmm_(previous.reshape(-1, hidden), weights[1].t())
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
    return LstmRecord(x, previous, factors, f, cell_factor)


def _gru_record(x, out, states, weights) -> GruRecord:
    """The gates, recomputed from the known outputs in two batched products."""
    (h0,), hidden = states, out.size(-1)
    previous = torch.cat([h0.unsqueeze(0), out[:-1]])
    biases = weights[2:] if len(weights) == 4 else (None, None)
    u = _affine(x, weights[0], biases[0])
    v = _affine(previous, weights[1], biases[1])
    rz = torch.add(u[..., : 2 * hidden], v[..., : 2 * hidden]).sigmoid_()
    r, z = rz.chunk(2, dim=-1)
    n = torch.addcmul(u[..., 2 * hidden :], r, v[..., 2 * hidden :]).tanh_()
    slopes = torch.addcmul(rz, rz, rz, value=-1.0)  # σ(1 − σ)
    reset_factor = slopes[..., :hidden] * v[..., 2 * hidden :]
    update_factor = slopes[..., hidden:] * (previous - n)
    new_factor = torch.addcmul(-n * n, z, n * n).sub_(z).add_(1.0)  # (1 − z)(1 − n²)
    return GruRecord(x, previous, reset_factor, update_factor, new_factor, r, z)


def recurrent_primal(
    call: RecurrentCall, x: torch.Tensor, states: list, params: list
) -> tuple[torch.Tensor, ...]:
    """``(output, *final states, *records)``: the fused kernel, layer by layer, then the
    layers' records flattened (:func:`unflatten` undoes it).

    The outputs keep their autograd graph; the records are detached.
    """
    kernel, record = (torch.lstm, _lstm_record) if call.lstm else (torch.gru, _gru_record)
    finals: list[list[torch.Tensor]] = [[] for _ in states]
    records = []
    layer_input = x
    for layer in range(call.num_layers):
        weights = params[layer * call.per_layer : (layer + 1) * call.per_layer]
        initial = [s[layer : layer + 1] for s in states]
        hx = initial if call.lstm else initial[0]
        out, *last = kernel(layer_input, hx, weights, call.has_biases, 1, 0.0, call.train,
                            False, call.batch_first)  # fmt: skip
        with torch.no_grad():
            records.append(
                record(
                    _time_major(layer_input.detach(), call.batch_first),
                    _time_major(out.detach(), call.batch_first),
                    [s[layer].detach() for s in states],
                    [w.detach() for w in weights],
                )
            )
        for kept, state in zip(finals, last, strict=True):
            kept.append(state)
        layer_input = out
    return (layer_input, *(torch.cat(kept) for kept in finals), *_flatten(records))


def _products(pairs, biases, like: torch.Tensor, width: int) -> torch.Tensor:
    """``Σ left rightᵀ + Σ biases`` over the pairs and biases that are not ``None``
    (zeros shaped like ``like`` but ``width`` wide if there are none)."""
    total = None
    for left, right in pairs:
        if left is not None and right is not None:
            term = torch.matmul(left, right.t())
            total = term if total is None else total.add_(term)
    if total is None:
        total = like.new_zeros(*like.shape[:-1], width)
    for b in biases:
        if b is not None:
            total += b
    return total


def _lstm_layer_tangent(record: LstmRecord, x_dot, state_dots, weights, dots):
    hidden = record.previous.size(-1)
    products = _products(
        ((record.inputs, dots[0]), (x_dot, weights[0]), (record.previous, dots[1])),
        dots[2:],
        record.previous,
        4 * hidden,
    )
    w_hh_t = weights[1].t()
    h_dot, c_dot = state_dots
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
    return outs, [h_dot, c_dot]


def _gru_layer_tangent(record: GruRecord, x_dot, state_dots, weights, dots):
    hidden = record.previous.size(-1)
    like, width = record.previous, 3 * hidden
    inputs = _products(((record.inputs, dots[0]), (x_dot, weights[0])), dots[2:3], like, width)
    recurrent = _products(((record.previous, dots[1]),), dots[3:4], like, width)
    recurrent[..., : 2 * hidden] += inputs[..., : 2 * hidden]  # r and z take u̇ + v̇
    new_inputs = inputs[..., 2 * hidden :]
    w_hh_t = weights[1].t()
    (h_dot,) = state_dots
    outs = torch.empty_like(record.previous)
    steps = zip(recurrent, new_inputs, record.reset_factor, record.update_factor,
                record.new_factor, record.reset, record.update, outs, strict=True)  # fmt: skip
    for product, new_input, reset_factor, update_factor, new_factor, reset, update, out in steps:
        v_dot = product if h_dot is None else torch.addmm(product, h_dot, w_hh_t)
        r_dot, z_dot, n_dot = v_dot.split(hidden, dim=-1)
        new_pre = torch.addcmul(new_input, reset_factor, r_dot).addcmul_(reset, n_dot)
        h_next = torch.mul(update_factor, z_dot, out=out).addcmul_(new_factor, new_pre)
        if h_dot is not None:
            h_next.addcmul_(update, h_dot)
        h_dot = h_next
    return outs, [h_dot]


@torch.no_grad()
def recurrent_tangent(
    call: RecurrentCall,
    records: list,
    x_dot: torch.Tensor | None,
    state_dots: list,
    params: list,
    param_dots: list,
) -> tuple[torch.Tensor, ...]:
    """The tangents of ``(output, *final states)`` (``None`` tangents are zero)."""
    layer_tangent = _lstm_layer_tangent if call.lstm else _gru_layer_tangent
    layer_dot = None if x_dot is None else _time_major(x_dot, call.batch_first)
    finals: list[list[torch.Tensor]] = [[] for _ in state_dots]
    for layer, record in enumerate(records):
        span = slice(layer * call.per_layer, (layer + 1) * call.per_layer)
        weights = [w.detach() for w in params[span]]
        initial = [None if s is None else s[layer] for s in state_dots]
        layer_dot, last = layer_tangent(record, layer_dot, initial, weights, param_dots[span])
        for kept, state in zip(finals, last, strict=True):
            kept.append(state)
    assert layer_dot is not None
    out_dot = layer_dot.transpose(0, 1) if call.batch_first else layer_dot
    return (out_dot, *(torch.stack(kept) for kept in finals))
