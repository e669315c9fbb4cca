"""Both Jacobian engines against the dense Jacobian, on every model of the case matrix."""

from __future__ import annotations

import pytest
import torch
from cases import LOSSES

from benchmarks.oracles import dense_problem
from curveball._curvature.double_backward import DoubleBackwardEngine
from curveball._curvature.engine import owned_like
from curveball._curvature.forward_mode import ForwardModeEngine
from curveball._curvature.module_tensors import ModuleTensors
from curveball._undo import BufferSnapshot

ENGINES = {"forward": ForwardModeEngine, "double-backward": DoubleBackwardEngine}


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_jvp_and_vjp_equal_products_with_the_dense_jacobian(case, name):
    model, x, targets = case.make()
    params = list(model.parameters())
    tensors = ModuleTensors(model, params)
    engine = ENGINES[name](params, tensors)
    dense = dense_problem(model, x, LOSSES["cross_entropy"](targets))
    g = torch.Generator().manual_seed(1)
    t = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    u = torch.randn(dense["y"].shape, generator=g, dtype=torch.float64)
    flat = lambda vs: torch.cat([a.reshape(-1) for a in vs])  # noqa: E731
    snapshot = BufferSnapshot(tensors.current_buffers)
    y, jt = engine.linearize(lambda: model(x), t)
    jv = engine.jvp(v)
    back = engine.vjp(u)
    engine.finish()
    snapshot.restore()
    torch.testing.assert_close(y.detach(), dense["y"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jt.reshape(-1), dense["J"] @ flat(t), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jv.reshape(-1), dense["J"] @ flat(v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat(back), dense["J"].T @ u.reshape(-1), rtol=1e-10, atol=1e-12)


def test_owned_results_never_share_storage_and_follow_the_layout():
    p = torch.zeros(3, 2)
    q = torch.zeros(2, 3).t()  # a transposed layout
    shared = torch.ones(3, 2)
    out = owned_like([shared, shared, None], [p, q, p])  # y = p + q hands both one tensor
    assert out[0] is shared
    assert out[1].stride() == q.stride() and torch.equal(out[1], shared)
    assert torch.equal(out[2], torch.zeros(3, 2))
    storages = {t.untyped_storage().data_ptr() for t in out}
    assert len(storages) == 3
