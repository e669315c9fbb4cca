"""The curvature products stage: every pass's result against dense oracles (float64)."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from cases import tiny_problem

from benchmarks.oracles import dense_problem
from curveball import _layout
from curveball._distributed import Averager
from curveball._plan import Plan
from curveball._products import Batch, compute, read_scalars


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def setup(kind="mlp", decays=(0.0, 0.0), precondition=False, seed=0):
    model, x, loss_fn = tiny_problem(seed, kind=kind)
    params = list(model.parameters())
    groups = [
        {"params": params[:2], "weight_decay": decays[0]},
        {"params": params[2:], "weight_decay": decays[1]},
    ]
    layout = _layout.build(groups, model, "forward", lambda m: None, None)
    state = defaultdict(dict)
    _layout.attach_state(layout, state, precondition)
    g = torch.Generator().manual_seed(seed + 7)
    for z in layout.zs:
        z.copy_(torch.randn(z.shape, generator=g, dtype=z.dtype))
    if precondition:
        for v in layout.averages:
            v.copy_(torch.rand(v.shape, generator=g, dtype=v.dtype))
    warnings = []
    batch = Batch(
        lambda: model(x), loss_fn, tuple(decays), Averager(), False,
        lambda kind, message: warnings.append(kind),
    )  # fmt: skip
    return model, x, loss_fn, layout, batch, warnings


def plan(**changes) -> Plan:
    base = dict(step=1, lambd=0.5, refresh=True, trial=False, loss_scale=None,
                precondition=None, curvature_fraction=1.0)  # fmt: skip
    return Plan(**{**base, **changes})


def run(layout, batch, p):
    engine = layout.engines.engine
    try:
        products = compute(engine, batch, layout, p)
        scalars = read_scalars(engine, products, layout, p, batch)
    finally:
        engine.finish()
    return products, scalars


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_every_product_equals_the_dense_one(kind):
    model, x, loss_fn, layout, batch, _ = setup(kind, decays=(0.1, 0.0))
    products, _ = run(layout, batch, plan())
    dense = dense_problem(model, x, loss_fn)
    z, w = flat(layout.zs), dense["w"]
    jz = dense["J"] @ z
    torch.testing.assert_close(products.jz.reshape(-1), jz, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(products.h_jz.reshape(-1), dense["H"] @ jz, rtol=1e-12, atol=1e-12)
    kappa = torch.cat([torch.full((p.numel(),), 0.1 if i < 2 else 0.0, dtype=torch.float64)
                       for i, p in enumerate(model.parameters())])  # fmt: skip
    dz = dense["G"] @ z + dense["g"] + kappa * w + (0.5 + kappa) * z
    torch.testing.assert_close(flat(products.dz), dz, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(products.jdz.reshape(-1), dense["J"] @ dz, rtol=1e-11, atol=1e-12)


def test_the_curvature_terms_and_group_products_are_the_dense_inner_products():
    model, x, loss_fn, layout, batch, _ = setup(decays=(0.2, 0.1))
    products, scalars = run(layout, batch, plan())
    dense = dense_problem(model, x, loss_fn)
    z, dz, h = flat(layout.zs), flat(products.dz), dense["H"]
    jz, jdz = dense["J"] @ z, dense["J"] @ dz
    expected = {"jdz_h_jdz": jdz @ h @ jdz, "jz_h_jdz": jz @ h @ jdz, "jz_h_jz": jz @ h @ jz,
                "jl_jdz": dense["J_L"] @ jdz, "jl_jz": dense["J_L"] @ jz}  # fmt: skip
    for name, value in expected.items():
        assert scalars.curvature[name] == pytest.approx(value.item(), rel=1e-11, abs=1e-13)
    first = sum(p.numel() for p in list(model.parameters())[:2])
    for name, (a, b) in {"dz_dz": (dz, dz), "z_dz": (z, dz), "z_z": (z, z),
                         "w_dz": (dense["w"], dz), "w_z": (dense["w"], z)}.items():  # fmt: skip
        per_group = ((a[:first] @ b[:first]).item(), (a[first:] @ b[first:]).item())
        assert scalars.groups[name] == pytest.approx(per_group, rel=1e-11, abs=1e-13)
    assert scalars.loss == pytest.approx(loss_fn(model(x)).item(), rel=1e-14)


def test_the_preconditioned_direction_and_its_average():
    model, x, loss_fn, layout, batch, _ = setup(precondition=True)
    before = [v.clone() for v in layout.averages]
    raw, _ = run(*setup()[3:5], plan())
    products, _ = run(layout, batch, plan(precondition=(0.9, 1e-3)))
    for d, r, v, new in zip(products.dz, raw.dz, before, products.averages, strict=True):
        expected_v = 0.9 * v + 0.1 * r * r
        torch.testing.assert_close(new, expected_v, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(d, r / (expected_v.sqrt() + 1e-3), rtol=1e-12, atol=1e-14)
    for v, old in zip(layout.averages, before, strict=True):
        assert torch.equal(v, old)  # the step's own average is only adopted if it stands


def test_a_curvature_minibatch_holds_the_leading_rows_and_scales_the_terms():
    model, x, loss_fn, layout, batch, warnings = setup()
    products, scalars = run(layout, batch, plan(curvature_fraction=0.5))
    n = x.shape[0]
    assert products.rows == n // 2 and not warnings
    dense = dense_problem(model, x, loss_fn)
    jdz = dense["J"] @ flat(products.dz)
    rows = jdz.view(n, -1)[: n // 2].reshape(-1)
    torch.testing.assert_close(products.jdz[: n // 2].reshape(-1), rows, rtol=1e-11, atol=1e-12)
    assert torch.equal(products.jdz[n // 2 :], torch.zeros_like(products.jdz[n // 2 :]))
    h_rows = dense["H"][: rows.numel(), : rows.numel()]
    assert scalars.curvature["jdz_h_jdz"] == pytest.approx(2 * (rows @ h_rows @ rows).item(),
                                                           rel=1e-10)  # fmt: skip
    assert "raw_dz" in scalars.groups


def test_no_refresh_skips_the_second_pass():
    *_, layout, batch, _ = setup()
    products, scalars = run(layout, batch, plan(refresh=False))
    assert products.jdz is None and scalars.curvature is None
    assert set(scalars.groups) == {"dz_dz"}
