"""The curvature product G v = Jᵀ H_L J v against the dense matrix built independently."""

from __future__ import annotations

import pytest
import torch
from cases import LOSSES

from benchmarks.oracles import dense_problem
from curveball import ggn_vector_product


@pytest.mark.parametrize("engine", ["forward", "double-backward"])
def test_ggn_product_matches_dense_matrix(case, loss_name, engine):
    model, x, targets = case.make()
    loss_fn = LOSSES[loss_name](targets)
    params = list(model.parameters())
    vector = [torch.randn_like(p) for p in params]
    buffers = [b.clone() for b in model.buffers()]

    product = ggn_vector_product(
        lambda: model(x), loss_fn, params, vector, module=model if engine == "forward" else None
    )

    dense = dense_problem(model, x, loss_fn)
    expected = dense["G"] @ torch.cat([v.reshape(-1) for v in vector])
    got = torch.cat([p.reshape(-1) for p in product])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    if engine == "forward":  # the product leaves running statistics alone
        for before, after in zip(buffers, model.buffers(), strict=True):
            assert torch.equal(before, after)
