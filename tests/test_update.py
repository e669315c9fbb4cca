"""The update stage: ``z ← ρ z − β d`` and ``w ← w + α z`` per group, against closed forms."""

from __future__ import annotations

import pytest
import torch

from curveball._update import move_, step_z_


def tensors(seed: int, dtype=torch.float64, shapes=((3, 2), (4,), (2, 2))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def test_z_takes_one_step_along_the_direction():
    zs, d = tensors(0), tensors(1)
    expected = [0.7 * z - 0.3 * x for z, x in zip(zs, d, strict=True)]
    step_z_(zs, d, 0.7, 0.3)
    for z, e in zip(zs, expected, strict=True):
        torch.testing.assert_close(z, e, rtol=1e-15, atol=1e-15)


def test_half_precision_z_combines_in_float32():
    zs = tensors(0, torch.float16)
    d = [(x * 1e-5).half() for x in tensors(1)]
    beta = 7.0e4  # beyond float16's range (65504): only the product with d is representable
    expected = [(z.float() * 0.5 - x.float() * beta).half() for z, x in zip(zs, d, strict=True)]
    step_z_(zs, d, 0.5, beta)
    for z, e in zip(zs, expected, strict=True):
        assert z.dtype == torch.float16 and torch.equal(z, e)


@pytest.mark.parametrize("lrs", [(1.0, 1.0), (0.5, 0.0), (0.0, 2.0)])
def test_each_group_moves_by_its_learning_rate(lrs):
    params, zs = tensors(2), tensors(3)
    members = [[0, 2], [1]]
    before = [p.clone() for p in params]
    move_(params, zs, members, lrs)
    for group, lr in zip(members, lrs, strict=True):
        for i in group:
            torch.testing.assert_close(params[i], before[i] + lr * zs[i], rtol=0, atol=0)
