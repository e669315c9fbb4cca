"""Snapshots: every random generator rewinds; buffers are put back."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from curveball._undo import BufferSnapshot, RngSnapshot, buffers_kept


def draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def test_rng_snapshot_rewinds_torch_python_and_numpy():
    snapshot = RngSnapshot([torch.device("cpu")])
    first = draws()
    snapshot.restore()
    assert draws() == first


def test_generators_nothing_drew_from_are_not_rewound_and_the_others_are():
    before = RngSnapshot([torch.device("cpu")])
    np.random.standard_normal()  # a pass that draws from NumPy only
    after = RngSnapshot([torch.device("cpu")])
    after.forget_unused(before)
    assert before.python is None and after.python is None
    assert before.numpy is not None and after.numpy is not None
    python_state = random.getstate()
    before.restore()
    assert random.getstate() == python_state  # Python's generator is left alone
    first = np.random.standard_normal()
    before.restore()
    assert np.random.standard_normal() == first  # NumPy's still rewinds


def test_buffer_snapshot_puts_values_back_in_the_registered_tensors():
    bn = nn.BatchNorm1d(3)
    snapshot = BufferSnapshot(lambda: list(bn.buffers()))
    bn(torch.randn(8, 3))
    assert bn.num_batches_tracked.item() == 1
    snapshot.restore()
    assert bn.num_batches_tracked.item() == 0 and torch.equal(bn.running_mean, torch.zeros(3))


def test_buffers_kept_protects_the_modules_that_ran():
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    other = nn.BatchNorm1d(3)
    with buffers_kept():
        net(torch.randn(8, 2))
        assert net[1].num_batches_tracked.item() == 1
    other(torch.randn(8, 3))  # outside the block: kept as it is
    assert net[1].num_batches_tracked.item() == 0
    assert torch.equal(net[1].running_var, torch.ones(3))
    assert other.num_batches_tracked.item() == 1
