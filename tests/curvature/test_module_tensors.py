"""Swapping tensors into a module: done and undone exactly, shared parameters included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curveball._curvature.module_tensors import ModuleTensors


def test_substitution_is_undone_even_after_an_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 2))
    model[2].weight = model[0].weight  # one parameter in two slots (tied weights)
    params = list(model.parameters())
    tensors = ModuleTensors(model, params)
    assert [len(slots) for slots in tensors.param_slots] == [2, 1, 1, 1, 1]
    replacement = [torch.zeros_like(p) for p in params]
    buffers = [b.clone() for b in tensors.current_buffers()]
    with pytest.raises(RuntimeError, match="boom"), tensors.substituted(replacement, buffers):
        assert model[0].weight is replacement[0] and model[2].weight is replacement[0]
        assert model[1].running_mean is buffers[0]
        raise RuntimeError("boom")
    assert list(model.parameters()) == params
    assert model[1].running_mean is tensors.buffers[0]


def test_parameters_outside_the_module_are_named():
    stray = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="not registered"):
        ModuleTensors(nn.Linear(2, 2), [stray])


def test_recurrent_layers_compute_with_the_substituted_weights():
    lstm = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    tensors = ModuleTensors(lstm, list(lstm.parameters()))
    zeros = [torch.zeros_like(p) for p in lstm.parameters()]
    with tensors.substituted(zeros):
        out, _ = lstm(x)
    assert torch.equal(out, torch.zeros_like(out))  # all weights zero: h stays zero
    assert not torch.equal(lstm(x)[0], torch.zeros_like(out))  # and the real ones are back
