"""The step's scalars: read by name after one host transfer; a step syncs with the host once."""

from __future__ import annotations

import math

import pytest
import torch
from cases import CASES, cross_entropy

from curveball import CurveBall
from curveball._distributed import Averager
from curveball._step_scalars import CURVATURE_TERMS, StepScalars

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def test_values_come_back_by_name():
    curvature = {name: torch.tensor(float(i + 1)) for i, name in enumerate(CURVATURE_TERMS)}
    groups = {
        "dz_dz": torch.tensor([4.0, 5.0], dtype=torch.float64),
        "z_z": torch.tensor([6.0, 7.0], dtype=torch.float64),
    }
    y = torch.tensor([[1.0, 2.0]])
    s = StepScalars.read(torch.tensor(0.25), y, curvature, groups, Averager())
    assert s.loss == 0.25 and s.predictions_finite
    assert s.curvature == {name: float(i + 1) for i, name in enumerate(CURVATURE_TERMS)}
    assert s.groups == {"dz_dz": (4.0, 5.0), "z_z": (6.0, 7.0)}
    bad = StepScalars.read(torch.tensor(0.25), y * math.inf, None, groups, Averager())
    assert not bad.predictions_finite and bad.curvature is None


@pytest.fixture
def host_reads(monkeypatch):
    """Counts every read of a tensor's value by the host."""
    count = {"n": 0}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_a_step_reads_the_device_once_and_a_test_step_twice(host_reads, weight_decay):
    model, x, t = CASES["cnn_bn"].make(batch=8, dtype=torch.float32)
    opt = CurveBall(model, weight_decay=weight_decay, lambda_interval=3)
    reads = []
    for _ in range(6):
        before = host_reads["n"]
        opt.step(lambda: model(x), cross_entropy(t))
        reads.append(host_reads["n"] - before)
    assert reads == [1, 1, 2, 1, 1, 2]  # steps 3 and 6 test the damping
