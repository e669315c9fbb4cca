"""``nn.MultiheadAttention`` under the lean rules against PyTorch's own forward-mode result.

The rebuilt call (:mod:`curveball._curvature.multi_head_rule`) must give PyTorch's
primal and tangent for every mask, projection and layout option it accepts, hand
its projections and its attention to the lean rules (so that the second pass
replays them), and leave every call it does not accept to PyTorch, still exact.
"""

from __future__ import annotations

import pytest
import torch
from dual_numbers import run_dual
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from curveball._curvature.lean_rules import LeanTangents

L, S, N, E, HEADS = 5, 6, 3, 8, 2


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def causal_bool() -> torch.Tensor:  # MultiheadAttention's convention: True masks out
    return torch.ones(L, L, dtype=torch.bool).triu(1)


def padding() -> torch.Tensor:
    mask = torch.zeros(N, S, dtype=torch.bool)
    mask[0, -2:] = True
    mask[2, 0] = True
    return mask


# name: (module options, function of the module giving (query, key, value, call keywords),
#        records of the lean rules: linear layers and attention)
CASES = {
    "self": ({}, lambda: (x := randn(L, N, E), x, x, {}), 3),
    "self-causal": (
        {},
        lambda: (x := randn(L, N, E), x, x, {"attn_mask": causal_bool(), "is_causal": True}),
        3,
    ),
    "self-causal-with-padding": (
        {},
        lambda: (
            x := randn(L, N, E),
            x,
            x,
            {
                "attn_mask": causal_bool(),
                "is_causal": True,
                "key_padding_mask": padding()[:, :L],
            },
        ),
        3,
    ),
    "cross-padding": (
        {},
        lambda: (randn(L, N, E), m := randn(S, N, E), m, {"key_padding_mask": padding()}),
        5,
    ),
    "float-padding-and-mask": (
        {},
        lambda: (
            randn(L, N, E),
            m := randn(S, N, E),
            m,
            {"key_padding_mask": randn(N, S), "attn_mask": randn(L, S)},
        ),
        5,
    ),
    "mask-per-head": (
        {},
        lambda: (x := randn(L, N, E), x, x, {"attn_mask": randn(N * HEADS, L, L)}),
        3,
    ),
    "separate-weights": (
        {"kdim": 5, "vdim": 7},
        lambda: (randn(L, N, E), randn(S, N, 5), randn(S, N, 7), {}),
        5,
    ),
    "no-bias": ({"bias": False}, lambda: (x := randn(L, N, E), x, x, {}), 3),
    "batch-first": (
        {"batch_first": True},
        lambda: (x := randn(N, L, E), x, x, {"attn_mask": causal_bool()}),
        3,
    ),
}


def functional(module: nn.MultiheadAttention, inputs):
    """The attention's output as a function of its parameters."""
    q, k, v, kwargs = inputs
    names = [n for n, _ in module.named_parameters()]

    def call(*weights):
        params = dict(zip(names, weights, strict=True))
        kw = {"need_weights": False, **kwargs}
        return torch.func.functional_call(module, params, (q, k, v), kw)[0]

    return call


def run_attention(module: nn.MultiheadAttention, inputs, rules):
    """The output (primal, tangent) under ``rules`` for random tangents of the parameters."""
    primals = [p.detach() for p in module.parameters()]
    tangents = [randn(*p.shape) for p in primals]
    primal, tangent = run_dual(functional(module, inputs), primals, tangents, rules)
    return primal[0], tangent[0], tangents


def builtin(module, inputs, tangents):
    """PyTorch's own result: its explicit attention path (no dropout, training mode so
    that no fused inference kernel is taken), differentiated by ``torch.func.jvp``."""
    primals = tuple(p.detach() for p in module.parameters())
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(functional(module, inputs), primals, tuple(tangents))


def module(options: dict) -> nn.MultiheadAttention:
    return nn.MultiheadAttention(E, HEADS, **options).double().train()


@pytest.mark.parametrize("name", sorted(CASES))
def test_rebuilt_attention_equals_pytorch_and_uses_the_lean_rules(name):
    torch.manual_seed(0)
    options, make_inputs, records = CASES[name]
    attention = module(options)
    inputs = make_inputs()
    rules = LeanTangents(0, record=True)
    primal, tangent, tangents = run_attention(attention, inputs, rules)
    expected = builtin(attention, inputs, tangents)
    torch.testing.assert_close(primal, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, expected[1], rtol=1e-12, atol=1e-12)
    # the projections and the attention went through the lean rules, not PyTorch's path
    assert [r.key[0] for r in rules.records].count("attention") == 1
    assert len(rules.records) == records


def test_the_second_pass_replays_the_projections_and_the_attention():
    torch.manual_seed(0)
    attention = module({})
    inputs = CASES["self-causal"][1]()
    recorder = LeanTangents(0, record=True)
    first, _, _ = run_attention(attention, inputs, recorder)

    replayer = LeanTangents(0, replay=recorder.records)
    reused = []
    original = replayer._reuse
    replayer._reuse = lambda key: reused.append(original(key)) or reused[-1]
    primal, tangent, tangents = run_attention(attention, inputs, replayer)
    assert len(reused) == 3 and all(r is not None for r in reused)
    expected = builtin(attention, inputs, tangents)
    torch.testing.assert_close(primal, first, rtol=0, atol=0)
    torch.testing.assert_close(tangent, expected[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"add_bias_kv": True}, "bias_k"),
        ({"add_zero_attn": True}, "zero attention"),
        ({}, "unbatched"),
        ({}, "need_weights"),
    ],
)
def test_calls_the_rule_does_not_accept_stay_exact_on_pytorchs_path(options, reason):
    torch.manual_seed(0)
    attention = module(options)
    x = randn(L, E) if reason == "unbatched" else randn(L, N, E)
    inputs = (x, x, x, {"need_weights": reason == "need_weights"})
    rules = LeanTangents(0, record=True)
    primal, tangent, tangents = run_attention(attention, inputs, rules)
    expected = builtin(attention, inputs, tangents)
    torch.testing.assert_close(primal, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, expected[1], rtol=1e-12, atol=1e-12)
    assert rules.records == []  # inside PyTorch's function: the mode saw nothing


def test_evaluation_mode_gives_the_training_modes_function_without_dropout():
    """In evaluation mode (no fused inference path while the rules are active) the
    rebuilt call still equals PyTorch's result."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(E, HEADS, batch_first=True).double().eval()
    x = randn(N, L, E)
    inputs = (x, x, x, {})
    rules = LeanTangents(0, record=True)
    primal, tangent, tangents = run_attention(attention, inputs, rules)
    expected = builtin(attention.train(), inputs, tangents)
    torch.testing.assert_close(primal, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, expected[1], rtol=1e-12, atol=1e-12)
    assert len(rules.records) == 3


@pytest.mark.parametrize("training", [True, False])
def test_dropout_applies_in_training_mode_only(training):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(E, HEADS, dropout=0.5).double().train(training)
    inputs = CASES["self"][1]()
    rules = LeanTangents(0, record=True)
    run_attention(attention, inputs, rules)
    keep = next(r for r in rules.records if r.key[0] == "attention").tensors[2]
    assert (keep is not None) == training
    if training:
        assert set(keep.unique().tolist()) == {0.0, 2.0}


def test_boolean_masks_of_a_direct_functional_call():
    """``nn.MultiheadAttention`` turns boolean masks into additive ones before the call;
    a direct call of ``F.multi_head_attention_forward`` hands them over as they are."""
    torch.manual_seed(0)
    attention = module({})
    x, memory = randn(L, N, E), randn(S, N, E)
    attn_mask = torch.zeros(L, S, dtype=torch.bool)
    attn_mask[1, :3] = True

    def call(in_w, in_b, out_w, out_b):
        return torch.nn.functional.multi_head_attention_forward(
            x, memory, memory, E, HEADS, in_w, in_b, None, None, False, 0.0, out_w, out_b,
            key_padding_mask=padding(), need_weights=False, attn_mask=attn_mask,
        )[0]  # fmt: skip

    primals = [p.detach() for p in attention.parameters()]
    tangents = [randn(*p.shape) for p in primals]
    rules = LeanTangents(0, record=True)
    got = run_dual(call, primals, tangents, rules)
    with sdpa_kernel(SDPBackend.MATH):
        expected = torch.func.jvp(call, tuple(primals), tuple(tangents))
    assert len(rules.records) == 5
    torch.testing.assert_close(got[0][0], expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1][0], expected[1], rtol=1e-12, atol=1e-12)
