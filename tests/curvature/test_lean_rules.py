"""The lean forward-mode rules against PyTorch's own forward-mode formulas.

Every rule must give exactly the primal and tangent of the built-in rule, with
the input carrying a tangent or not, however the function is called; replaying
a recorded pass must give the same results again while reusing the recorded
primal tensors, and must fall back to computing when a record is stale.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from dual_numbers import run_first as run
from torch.nn.attention import SDPBackend, sdpa_kernel

from curveball._curvature.lean_rules import LeanTangents

gen = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# (name, function of (x, w, b), shapes of (x, w, b))
BILINEAR = {
    "linear": (lambda x, w, b: F.linear(x, w, b), [(4, 5), (3, 5), (3,)]),
    "linear-bias-kw": (lambda x, w, b: F.linear(x, w, bias=b), [(2, 4, 5), (3, 5), (3,)]),
    "linear-no-bias": (lambda x, w, b: F.linear(x, w), [(4, 5), (3, 5), (3,)]),
    "conv1d": (
        lambda x, w, b: F.conv1d(x, w, b, stride=2, padding=1),
        [(2, 3, 9), (4, 3, 3), (4,)],
    ),
    "conv2d": (
        lambda x, w, b: F.conv2d(x, w, b, 1, 2, 2),  # stride, padding, dilation positionally
        [(2, 3, 7, 6), (4, 3, 3, 3), (4,)],
    ),
    "conv2d-groups": (
        lambda x, w, b: F.conv2d(x, w, b, padding=1, groups=2),
        [(2, 4, 5, 5), (6, 2, 3, 3), (6,)],
    ),
    "conv3d": (
        lambda x, w, b: F.conv3d(x, w, b, padding=1),
        [(1, 2, 4, 4, 3), (3, 2, 3, 3, 3), (3,)],
    ),
}


@pytest.mark.parametrize("input_tangent", [False, True])
@pytest.mark.parametrize("name", sorted(BILINEAR))
def test_bilinear_rule_equals_builtin(name, input_tangent):
    fn, shapes = BILINEAR[name]
    primals = [randn(*s) for s in shapes]
    tangents = [randn(*s) for s in shapes]
    if not input_tangent:
        tangents[0] = None
    expected = run(fn, primals, tangents)
    rules = LeanTangents(0, record=True)
    got = run(fn, primals, tangents, rules)
    assert len(rules.records) == 1  # the lean rule, not the built-in one, handled the call
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=1e-12)


POOLS = {
    "max1d": (lambda x: F.max_pool1d(x, 3, 2), (2, 3, 11)),
    "max2d-ceil": (lambda x: F.max_pool2d(x, 3, stride=2, ceil_mode=True), (2, 3, 8, 8)),
    "max2d-indices-kw": (lambda x: F.max_pool2d(x, 2, return_indices=True), (2, 3, 6, 6)),
    "max2d-indices-positional": (lambda x: F.max_pool2d(x, 2, 2, 0, 1, False, True), (3, 6, 6)),
    "max3d": (lambda x: F.max_pool3d(x, 2, padding=1), (1, 2, 4, 5, 3)),
    "avg2d": (lambda x: F.avg_pool2d(x, 3, 2, 1, True, False), (2, 3, 7, 7)),
    "adaptive-avg2d": (lambda x: F.adaptive_avg_pool2d(x, (2, 3)), (2, 3, 7, 8)),
    "avg1d": (lambda x: F.avg_pool1d(x, 2), (2, 3, 8)),
}


@pytest.mark.parametrize("name", sorted(POOLS))
def test_pooling_rule_equals_builtin(name):
    fn, shape = POOLS[name]
    x, t = randn(*shape), randn(*shape)
    expected = run(fn, [x], [t])
    rules = LeanTangents(0, record=True)
    got = run(fn, [x], [t], rules)
    assert len(rules.records) == 1  # the lean rule, not the built-in one, handled the call
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=1e-12)


def test_max_pool_returns_the_builtin_indices():
    x, t = randn(2, 3, 6, 6), randn(2, 3, 6, 6)
    with fwAD.dual_level() as level, LeanTangents(level):
        _, indices = F.max_pool2d(fwAD.make_dual(x, t), 2, return_indices=True)
    _, expected = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(indices, expected)


def network(x, w1, b1, w2, b2):
    h = F.max_pool2d(F.conv2d(x, w1, b1, padding=1), 2)
    h = F.avg_pool2d(torch.tanh(h), 2)
    return F.linear(h.flatten(1), w2, b2)


def network_inputs():
    x = randn(3, 2, 8, 8)
    params = [randn(4, 2, 3, 3), randn(4), randn(5, 16), randn(5)]
    return x, params


def test_replay_reuses_the_recorded_primals_and_gives_the_same_tangent():
    x, params = network_inputs()
    t1 = [randn(*p.shape) for p in params]
    t2 = [randn(*p.shape) for p in params]
    recorder = LeanTangents(0, record=True)
    run(network, [x, *params], [None, *t1], recorder)
    assert len(recorder.records) == 4  # conv, max pool, avg pool, linear

    replayer = LeanTangents(0, replay=recorder.records)
    reused = []
    original = replayer._reuse
    replayer._reuse = lambda key: reused.append(original(key)) or reused[-1]
    got = run(network, [x, *params], [None, *t2], replayer)
    expected = run(network, [x, *params], [None, *t2])
    assert all(r is not None for r in reused)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=1e-12)


def test_replay_recomputes_records_modified_in_place_and_after_a_mismatch():
    x, params = network_inputs()
    t = [randn(*p.shape) for p in params]
    recorder = LeanTangents(0, record=True)
    run(network, [x, *params], [None, *t], recorder)
    recorder.records[0].tensors[0].mul_(100.0)  # e.g. an in-place activation after the conv

    replayer = LeanTangents(0, replay=recorder.records)
    got = run(network, [x, *params], [None, *t], replayer)
    expected = run(network, [x, *params], [None, *t])
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=1e-12)
    assert replayer._replay is None  # the stale record stopped the replay

    # A pass on another batch shape does not match the records either.
    x2 = randn(5, 2, 8, 8)
    fresh = LeanTangents(0, record=True)
    run(network, [x, *params], [None, *t], fresh)
    got = run(network, [x2, *params], [None, *t], LeanTangents(0, replay=fresh.records))
    expected = run(network, [x2, *params], [None, *t])
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=1e-12)


def test_primal_of_a_recording_pass_back_propagates_like_a_plain_one():
    x, params = network_inputs()
    leaves = [p.clone().requires_grad_(True) for p in params]
    t = [randn(*p.shape) for p in params]
    cotangent = randn(3, 5)
    with fwAD.dual_level() as level, LeanTangents(level, record=True):
        out = network(x, *[fwAD.make_dual(p, v) for p, v in zip(leaves, t, strict=True)])
        primal = fwAD.unpack_dual(out).primal
    grads = torch.autograd.grad(primal, leaves, cotangent)
    plain = [p.clone().requires_grad_(True) for p in params]
    expected = torch.autograd.grad(network(x, *plain), plain, cotangent)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_calls_without_dual_operands_are_untouched():
    x, w = randn(4, 5), randn(3, 5)
    with fwAD.dual_level() as level, LeanTangents(level, record=True) as rules:
        out = F.linear(x, w)
    assert fwAD.unpack_dual(out).tangent is None
    torch.testing.assert_close(out, x @ w.T, rtol=1e-12, atol=1e-12)
    assert rules.records == []


def test_a_curveball_step_runs_only_the_necessary_convolutions():
    """Two conv layers, one step without a trust-region test: 8 forward convolutions.

    First pass: layer 1 computes its primal and ``conv(x, Ẇ)`` (the data has no
    tangent), layer 2 its primal, ``conv(ẋ, W)`` and ``conv(x, Ẇ)``: 5. Second pass,
    replayed: 1 + 2 tangent products. PyTorch's built-in rule would run 12.
    """
    from torch import nn
    from torch.profiler import profile

    from curveball import CurveBall

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2, 2)
    )
    for p in model[4].parameters():
        p.requires_grad_(False)
    x, t = torch.randn(4, 2, 5, 5), torch.randint(0, 2, (4,))
    opt = CurveBall(model, lambda_interval=100)
    with profile() as prof:
        opt.step(lambda: model(x), lambda y: F.cross_entropy(y, t))
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts["aten::convolution"] == 8


@pytest.mark.parametrize("jvp_follows", [True, False])
def test_engine_keeps_records_only_when_a_second_product_follows(jvp_follows):
    from torch import nn

    from curveball._curvature.forward_mode import ForwardModeEngine
    from curveball._curvature.module_tensors import ModuleTensors

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2)).double()
    params = list(model.parameters())
    x = randn(4, 2, 4, 4)
    engine = ForwardModeEngine(params, ModuleTensors(model, params))
    engine.linearize(lambda: model(x), [randn(*p.shape) for p in params], jvp_follows=jvp_follows)
    assert (len(engine._records) == 2) is jvp_follows  # conv and linear, or nothing
    v = [randn(*p.shape) for p in params]
    got = engine.jvp(v)  # still right without records: the layers are computed
    engine.finish()
    _, expected = torch.func.jvp(
        lambda *w: torch.func.functional_call(
            model, dict(zip([n for n, _ in model.named_parameters()], w, strict=True)), (x,)
        ),
        tuple(p.detach() for p in params),
        tuple(v),
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_a_frozen_parameter_operand_is_handled_like_a_tensor():
    """A trainable weight with a frozen ``nn.Parameter`` bias still gets the lean rule."""
    x, xt = randn(4, 5), randn(4, 5)
    w, wt = randn(3, 5), randn(3, 5)
    bias = torch.nn.Parameter(randn(3), requires_grad=False)

    def fn(x, w):
        return F.linear(x, w, bias)

    expected = run(fn, [x, w], [xt, wt])
    rules = LeanTangents(0, record=True)
    got = run(fn, [x, w], [xt, wt], rules)
    assert len(rules.records) == 1
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- attention
def math_attention(**options):
    def attend(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):  # PyTorch's own forward-mode formulas
            return F.scaled_dot_product_attention(q, k, v, **options)

    return attend


ATTENTION = {
    "plain": ({}, 4),
    "causal": ({"is_causal": True}, 4),
    "bool_mask": ({"attn_mask": torch.rand(5, 6, generator=gen) > 0.3}, 4),
    "additive_mask": ({"attn_mask": randn(5, 6)}, 4),
    "scale": ({"scale": 0.3}, 4),
    "gqa": ({"enable_gqa": True}, 2),
}


@pytest.mark.parametrize("tangent_of", ["q", "k", "v", "qkv"])
@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_attention_rule_equals_the_math_backend(name, tangent_of):
    options, kv_heads = ATTENTION[name]
    primals = [randn(2, 4, 5, 8), randn(2, kv_heads, 6, 8), randn(2, kv_heads, 6, 8)]
    if name == "bool_mask":
        options["attn_mask"][:, 0] = True  # no fully masked row: the math backend gives NaN
    tangents = [
        randn(*p.shape) if n in tangent_of else None for n, p in zip("qkv", primals, strict=True)
    ]
    rules = LeanTangents(0, record=True)
    ours = run(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **options), primals, tangents, rules
    )
    theirs = run(math_attention(**options), primals, tangents)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-12, atol=1e-12)
    replayed = run(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **options),
        primals,
        tangents,
        LeanTangents(0, replay=rules.records),
    )
    assert torch.equal(replayed[1], ours[1])


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_attention_fully_masked_rows_give_zeros(kind):
    """A query row with every key masked attends to nothing (output and tangent 0), as
    PyTorch's fused kernels give; the other rows are the math backend's."""
    primals = [randn(2, 3, 5, 4), randn(2, 3, 6, 4), randn(2, 3, 6, 4)]
    tangents = [randn(*p.shape) for p in primals]
    allowed = torch.ones(5, 6, dtype=torch.bool)
    allowed[2] = False
    allowed[4, :3] = False
    mask = (
        allowed
        if kind == "bool"
        else torch.zeros(5, 6, dtype=torch.float64).masked_fill_(~allowed, -math.inf)
    )
    ours = run(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        primals,
        tangents,
        LeanTangents(0),
    )
    assert torch.equal(ours[0][..., 2, :], torch.zeros(2, 3, 4))
    assert torch.equal(ours[1][..., 2, :], torch.zeros(2, 3, 4))
    rows = [0, 1, 3, 4]
    theirs = run(math_attention(attn_mask=mask[rows]), [primals[0][..., rows, :], *primals[1:]],
                 [tangents[0][..., rows, :], *tangents[1:]])  # fmt: skip
    torch.testing.assert_close(ours[0][..., rows, :], theirs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1][..., rows, :], theirs[1], rtol=1e-12, atol=1e-12)


def test_attention_dropout_uses_one_mask_for_the_primal_and_every_tangent():
    primals = [randn(2, 3, 5, 4), randn(2, 3, 5, 4), randn(2, 3, 5, 4)]
    tangents = [randn(*p.shape) for p in primals]
    torch.manual_seed(1)
    rules = LeanTangents(0, record=True)
    primal, tangent = run(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.4),
        primals,
        tangents,
        rules,
    )
    keep = rules.records[0].tensors[2]
    assert set(keep.unique().tolist()) == {0.0, 1.0 / 0.6}

    def with_fixed_mask(q, k, v):
        weights = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)
        return (weights * keep) @ v

    expected = torch.func.jvp(with_fixed_mask, tuple(primals), tuple(tangents))
    torch.testing.assert_close(primal, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, expected[1], rtol=1e-12, atol=1e-12)


# (name, function of (x, w, b), shapes of (x, w, b)); statistics are fresh per call
def _bn(training: bool, channels: int = 3, **kw):
    def fn(x, w, b):
        mean = torch.linspace(-0.5, 0.5, channels, dtype=torch.float64)
        var = torch.linspace(0.5, 2.0, channels, dtype=torch.float64)
        return F.batch_norm(x, mean, var, w, b, training, **kw)

    return fn


BATCH_NORM = {
    "train-2d": (_bn(True), [(5, 3, 4, 4), (3,), (3,)]),
    "train-1d-seq": (_bn(True, momentum=0.3, eps=1e-3), [(4, 3, 6), (3,), (3,)]),
    "train-flat": (_bn(True), [(6, 3), (3,), (3,)]),
    "eval-2d": (_bn(False), [(5, 3, 4, 4), (3,), (3,)]),
    "train-no-affine": (lambda x, w, b: F.batch_norm(x, None, None, training=True), [(5, 3, 4)]),
    "train-keywords": (
        lambda x, w, b: F.batch_norm(x, None, None, weight=w, bias=b, training=True, eps=1e-4),
        [(5, 3, 4), (3,), (3,)],
    ),
}


@pytest.mark.parametrize(
    "name, tangent_of",
    [
        (name, of)
        for name in sorted(BATCH_NORM)
        for of in ("x", "w", "b", "xwb")
        if len(BATCH_NORM[name][1]) == 3 or of == "x"
    ],
)
def test_batch_norm_rule_equals_builtin(name, tangent_of):
    fn, shapes = BATCH_NORM[name]
    primals = [randn(*s) for s in shapes] + [None] * (3 - len(shapes))
    tangents = [
        randn(*p.shape) if p is not None and ("xwb"[i] in tangent_of) else None
        for i, p in enumerate(primals)
    ]
    expected = run(fn, primals, tangents)
    got = run(fn, primals, tangents, LeanTangents(0))
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=1e-13)


def test_batch_norm_updates_running_statistics_like_the_builtin_and_replays():
    x, w, b = randn(8, 3, 5), randn(3), randn(3)
    stats = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    plain = [t.clone() for t in stats]
    F.batch_norm(x, *plain, w, b, True, 0.2)
    rules = LeanTangents(0, record=True)
    fn = lambda x, w: F.batch_norm(x, *stats, w, b, True, 0.2)  # noqa: E731
    first = run(fn, [x, w], [randn(8, 3, 5), randn(3)], rules)
    torch.testing.assert_close(stats, plain, rtol=0, atol=0)
    tangents = [randn(8, 3, 5), randn(3)]
    replayed = run(fn, [x, w], tangents, LeanTangents(0, replay=rules.records))
    torch.testing.assert_close(stats, plain, rtol=0, atol=0)  # replayed: no second update
    fresh = run(fn, [x, w], tangents)
    torch.testing.assert_close(replayed[0], first[0], rtol=0, atol=0)
    torch.testing.assert_close(replayed[1], fresh[1], rtol=1e-12, atol=1e-13)
