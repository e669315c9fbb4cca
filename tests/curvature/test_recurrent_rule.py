"""The LSTM and GRU tangent rules against PyTorch's own forward-mode formulas (native kernels).

The rules must give the built-in primals and the built-in tangents of the output
and of the final states, for every supported call (kind, layers,
``batch_first``, biases, an initial state with or without tangents, an input
with or without a tangent); replay must reuse the records and give the same
tangents; the recording pass must back-propagate like a plain one; and the calls
the rule leaves alone must still give the built-in results.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from dual_numbers import run_dual as run

from curveball._curvature.lean_rules import LeanTangents

gen = torch.Generator().manual_seed(0)
IN, HIDDEN, BATCH, STEPS = 3, 4, 2, 5


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def layer_params(
    gates: int, layers: int, bias: bool, bidirectional: bool = False, proj: int = 0
) -> list:
    out = []
    dirs = 2 if bidirectional else 1
    for layer in range(layers):
        width = IN if layer == 0 else (proj or HIDDEN) * dirs
        for _ in range(dirs):
            out += [randn(gates * HIDDEN, width), randn(gates * HIDDEN, proj or HIDDEN)]
            if bias:
                out += [randn(gates * HIDDEN), randn(gates * HIDDEN)]
            if proj:
                out.append(randn(proj, HIDDEN))
    return out


def call_layer(options: dict):
    """``fn(x, h0, c0, *params)``: the kernel's outputs (a GRU ignores ``c0``)."""
    layers, bias = options["layers"], options["bias"]
    dropout, train = options.get("dropout", 0.0), options.get("train", True)
    bidirectional, batch_first = options.get("bidirectional", False), options["batch_first"]

    def fn(x, h0, c0, *params):
        if options["kind"] == "gru":
            return torch.gru(x, h0, list(params), bias, layers, dropout, train, bidirectional,
                             batch_first)  # fmt: skip
        return torch.lstm(x, (h0, c0), list(params), bias, layers, dropout, train,
                          bidirectional, batch_first)  # fmt: skip

    return fn


def inputs(options: dict) -> list[torch.Tensor]:
    dirs = 2 if options.get("bidirectional", False) else 1
    layers = options["layers"]
    shape = (BATCH, STEPS, IN) if options["batch_first"] else (STEPS, BATCH, IN)
    state = (layers * dirs, BATCH, options.get("proj", 0) or HIDDEN)
    cell = (layers * dirs, BATCH, HIDDEN)
    gates = 4 if options["kind"] == "lstm" else 3
    params = layer_params(gates, layers, options["bias"], options.get("bidirectional", False),
                          options.get("proj", 0))  # fmt: skip
    return [randn(*shape), 0.5 * randn(*state), 0.5 * randn(*cell), *params]


SUPPORTED = {
    "one-layer-batch-first": {"layers": 1, "bias": True, "batch_first": True},
    "two-layers-time-major-no-bias": {"layers": 2, "bias": False, "batch_first": False},
    "three-layers-dropout-eval": {
        "layers": 3,
        "bias": True,
        "batch_first": True,
        "dropout": 0.5,
        "train": False,
    },
}
TANGENTS = {
    "weights": lambda i: i >= 3,
    "input-and-weights": lambda i: i == 0 or i >= 3,
    "state-only": lambda i: i in (1, 2),
    "everything": lambda i: True,
}


def tangents_for(primals, which: str):
    return [randn(*p.shape) if TANGENTS[which](i) else None for i, p in enumerate(primals)]


KINDS = ("lstm", "gru")


@pytest.mark.parametrize("which", sorted(TANGENTS))
@pytest.mark.parametrize("name", sorted(SUPPORTED))
@pytest.mark.parametrize("kind", KINDS)
def test_rule_equals_builtin(kind, name, which):
    options = SUPPORTED[name] | {"kind": kind}
    fn, primals = call_layer(options), inputs(options)
    tangents = tangents_for(primals, which)
    expected = run(fn, primals, tangents)
    rules = LeanTangents(0, record=True)
    got = run(fn, primals, tangents, rules)
    assert [r.key[0] for r in rules.records] == ["recurrent"]  # the rule ran
    for g, e in zip(got[0], expected[0], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    for g, e in zip(got[1], expected[1], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


UNSUPPORTED = {
    "lstm-bidirectional": {"layers": 1, "bias": True, "batch_first": True, "bidirectional": True},
    "lstm-projections": {"layers": 1, "bias": True, "batch_first": False, "proj": 2},
    "lstm-dropout-in-training": {"layers": 2, "bias": True, "batch_first": True, "dropout": 0.5},
    "gru-bidirectional": {"layers": 2, "bias": False, "batch_first": False, "bidirectional": True},
    "gru-dropout-in-training": {"layers": 2, "bias": True, "batch_first": True, "dropout": 0.5},
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_calls_the_rule_leaves_alone_keep_the_builtin_results(name):
    options = UNSUPPORTED[name] | {"kind": name.split("-")[0]}
    fn, primals = call_layer(options), inputs(options)
    tangents = tangents_for(primals, "everything")
    rules = LeanTangents(0, record=True)
    torch.manual_seed(3)
    got = run(fn, primals, tangents, rules)
    torch.manual_seed(3)
    expected = run(fn, primals, tangents)
    assert rules.records == []
    for g, e in zip(got[0] + got[1], expected[0] + expected[1], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_replay_reuses_the_record_and_gives_the_builtin_tangents(kind):
    options = SUPPORTED["two-layers-time-major-no-bias"] | {"kind": kind}
    fn, primals = call_layer(options), inputs(options)
    recorder = LeanTangents(0, record=True)
    first = run(fn, primals, tangents_for(primals, "everything"), recorder)
    replayer = LeanTangents(0, replay=recorder.records)
    reused = []
    original = replayer._reuse
    replayer._reuse = lambda key: reused.append(original(key)) or reused[-1]
    tangents = tangents_for(primals, "input-and-weights")
    got = run(fn, primals, tangents, replayer)
    expected = run(fn, primals, tangents)
    assert len(reused) == 1 and reused[0] is not None
    for g, f in zip(got[0], first[0], strict=True):
        torch.testing.assert_close(g, f, rtol=0, atol=0)  # the recorded primals themselves
    for g, e in zip(got[1], expected[1], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_recording_pass_back_propagates_like_a_plain_layer(kind):
    options = SUPPORTED["one-layer-batch-first"] | {"kind": kind}
    fn, primals = call_layer(options), inputs(options)
    leaves = [p.clone().requires_grad_(True) for p in primals[3:]]
    tangents = [randn(*p.shape) for p in leaves]
    with fwAD.dual_level() as level, LeanTangents(level, record=True):
        duals = [fwAD.make_dual(p, t) for p, t in zip(leaves, tangents, strict=True)]
        outs = [fwAD.unpack_dual(o).primal for o in fn(*primals[:3], *duals)]
    cotangents = [randn(*o.shape) for o in outs]
    grads = torch.autograd.grad(outs, leaves, cotangents)
    plain = [p.clone().requires_grad_(True) for p in primals[3:]]
    expected = torch.autograd.grad(fn(*primals[:3], *plain), plain, cotangents)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


class TinyLM(torch.nn.Module):
    def __init__(self, layers: int, kind: str = "lstm") -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(7, 3)
        layer = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
        self.recurrent = layer(3, 4, num_layers=layers, batch_first=True)
        self.head = torch.nn.Linear(4, 7)

    def forward(self, tokens):
        return self.head(self.recurrent(self.embedding(tokens))[0]).flatten(0, 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers", [1, 2])
def test_curveball_steps_through_the_rule_equal_the_double_backward_steps(layers, kind):
    from curveball import CurveBall

    tokens = torch.randint(0, 7, (3, 6), generator=gen)
    targets = torch.randint(0, 7, (18,), generator=gen)
    torch.manual_seed(0)
    models = [TinyLM(layers, kind).double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [CurveBall(models[0], forward_mode="forward"),
            CurveBall(models[1], forward_mode="double-backward")]  # fmt: skip
    for _ in range(6):  # a trust-region test on step 5
        for model, opt in zip(models, opts, strict=True):
            opt.step(lambda m=model: m(tokens), lambda y: F.cross_entropy(y, targets))
    assert opts[0].last.engine == "forward" and opts[1].last.engine == "double-backward"
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for a, b in zip(opts[0].state.values(), opts[1].state.values(), strict=True):
        torch.testing.assert_close(a["z"], b["z"], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", KINDS)
def test_a_float32_step_runs_the_primal_kernel_once(kind):
    """Pass 1 runs the layer's own kernel on the primal values (its graph carries the
    backward pass); pass 2 replays it. For the LSTM that kernel is oneDNN's fused layer:
    one forward and one backward call per step. (Without the rule, both passes run the
    native kernel on dual numbers.)"""
    from torch.profiler import profile

    from curveball import CurveBall

    torch.manual_seed(0)
    model = TinyLM(1, kind)
    tokens, targets = torch.randint(0, 7, (3, 6)), torch.randint(0, 7, (18,))
    opt = CurveBall(model, lambda_interval=100)
    with profile() as prof:
        opt.step(lambda: model(tokens), lambda y: F.cross_entropy(y, targets))
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get(f"aten::{kind}") == 1
    if kind == "lstm" and torch.backends.mkldnn.is_available():
        assert counts.get("aten::mkldnn_rnn_layer") == 1
        assert counts.get("aten::mkldnn_rnn_layer_backward") == 1
