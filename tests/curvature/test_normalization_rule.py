"""Layer, RMS and group normalisation rules against PyTorch's own forward-mode formulas.

Each rule must give exactly the built-in primal and the built-in tangent for
every combination of operands carrying a tangent, however the function is
called; the recording pass must back-propagate like a plain one, and replay
must reuse the record and give the built-in tangent again.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from dual_numbers import run_first as run

from curveball._curvature.lean_rules import LeanTangents

gen = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# (function of (x, w, b), shapes of (x, w, b)); b is ignored where the layer has none
NORMS = {
    "layer-norm": (lambda x, w, b: F.layer_norm(x, (5,), w, b), [(4, 3, 5), (5,), (5,)]),
    "layer-norm-2d-keywords": (
        lambda x, w, b: F.layer_norm(x, normalized_shape=[3, 5], weight=w, bias=b, eps=1e-3),
        [(4, 3, 5), (3, 5), (3, 5)],
    ),
    "layer-norm-no-affine": (lambda x, w, b: F.layer_norm(x, [5]), [(2, 5)]),
    "rms-norm": (lambda x, w, b: F.rms_norm(x, (5,), w), [(4, 3, 5), (5,)]),
    "rms-norm-eps": (lambda x, w, b: F.rms_norm(x, [3, 5], w, 1e-2), [(4, 3, 5), (3, 5)]),
    "group-norm": (lambda x, w, b: F.group_norm(x, 2, w, b), [(3, 4, 5, 2), (4,), (4,)]),
    "group-norm-flat-keywords": (
        lambda x, w, b: F.group_norm(x, num_groups=3, weight=w, bias=b, eps=1e-4),
        [(3, 6), (6,), (6,)],
    ),
    "group-norm-no-affine": (lambda x, w, b: F.group_norm(x, 1), [(2, 4, 3)]),
}


def cases():
    for name, (_, shapes) in sorted(NORMS.items()):
        for of in ("x", "w", "b", "xwb"):
            if all("xwb".index(c) < len(shapes) for c in of):
                yield name, of


@pytest.mark.parametrize("name, tangent_of", list(cases()))
def test_normalisation_rule_equals_builtin(name, tangent_of):
    fn, shapes = NORMS[name]
    primals = [randn(*s) for s in shapes] + [None] * (3 - len(shapes))
    tangents = [
        randn(*p.shape) if p is not None and "xwb"[i] in tangent_of else None
        for i, p in enumerate(primals)
    ]
    expected = run(fn, primals, tangents)
    rules = LeanTangents(0, record=True)
    got = run(fn, primals, tangents, rules)
    assert len(rules.records) == 1  # the rule ran
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["layer-norm", "rms-norm", "group-norm"])
def test_replay_and_back_propagation(name):
    fn, shapes = NORMS[name]
    x, *params = [randn(*s) for s in shapes]
    leaves = [p.clone().requires_grad_(True) for p in params]
    xt = randn(*x.shape)
    cotangent = randn(*x.shape)
    recorder = LeanTangents(0, record=True)
    with fwAD.dual_level() as level:
        recorder.level = level
        with recorder:
            duals = [fwAD.make_dual(p, randn(*p.shape)) for p in leaves]
            out = fn(fwAD.make_dual(x, xt), *duals, *[None] * (2 - len(duals)))
            primal = fwAD.unpack_dual(out).primal
    grads = torch.autograd.grad(primal, leaves, cotangent)
    plain = [p.clone().requires_grad_(True) for p in params]
    expected = torch.autograd.grad(fn(x, *plain, *[None] * (2 - len(plain))), plain, cotangent)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)

    tangents = [randn(*x.shape)] + [randn(*p.shape) for p in params]
    primals = [x, *[p.detach() for p in leaves], *[None] * (2 - len(params))]
    tangents += [None] * (3 - len(tangents))
    replayer = LeanTangents(0, replay=recorder.records)
    reused = []
    original = replayer._reuse
    replayer._reuse = lambda key: reused.append(original(key)) or reused[-1]
    got = run(fn, primals, tangents, replayer)
    fresh = run(fn, primals, tangents)
    assert len(reused) == 1 and reused[0] is not None
    torch.testing.assert_close(got[0], fresh[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], fresh[1], rtol=1e-12, atol=1e-12)
