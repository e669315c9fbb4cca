"""The layout: the trainable parameters by group, and the state tensors a step binds."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch import nn

from curveball import _layout


def model_and_groups():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = list(model.parameters())
    return model, [{"params": params[:2]}, {"params": params[2:]}]


def test_the_layout_is_rebuilt_only_when_the_trainable_set_changes():
    model, groups = model_and_groups()
    layout = _layout.build(groups, model, "auto", print, None)
    assert layout.members == [[0, 1], [2, 3]]
    assert _layout.build(groups, model, "auto", print, layout) is layout
    model[0].bias.requires_grad_(False)
    rebuilt = _layout.build(groups, model, "auto", print, layout)
    assert rebuilt is not layout and rebuilt.members == [[0], [1, 2]]
    assert rebuilt.in_group(1, ["a", "b", "c"]) == ["b", "c"]


def test_no_trainable_parameter_is_an_error():
    model, groups = model_and_groups()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        _layout.build(groups, model, "auto", print, None)


def test_z_and_the_average_are_the_optimizer_states_own_tensors():
    model, groups = model_and_groups()
    layout = _layout.build(groups, model, "auto", print, None)
    state = defaultdict(dict)
    saved = torch.arange(12.0).reshape(4, 3).t().contiguous().t()  # other strides
    state[layout.params[0]]["z"] = saved
    _layout.attach_state(layout, state, precondition=True)
    for p, z, v in zip(layout.params, layout.zs, layout.averages, strict=True):
        assert state[p]["z"] is z and state[p][_layout.AVERAGE] is v
        assert z.stride() == p.stride() and v.dtype == p.dtype
    assert torch.equal(layout.zs[0], saved) and layout.zs[0].stride() != saved.stride()
    assert not layout.zs[1].any()
    assert (layout.workspace is not None) == _layout.keeps_buffers(layout.params)


def test_a_saved_state_of_another_shape_is_refused():
    p = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"z of a parameter of shape \(2, 3\) has shape \(3,\)"):
        _layout.state_tensor({"z": torch.zeros(3)}, p, "z", torch.zeros_like(p))


def test_adopting_the_averages_swaps_buffers_instead_of_copying():
    model, groups = model_and_groups()
    layout = _layout.build(groups, model, "auto", print, None)
    state = defaultdict(dict)
    _layout.attach_state(layout, state, precondition=True)
    old, new = layout.averages, [torch.ones_like(v) for v in layout.averages]
    _layout.adopt_averages(layout, state, new)
    assert layout.averages is new and all(
        state[p][_layout.AVERAGE] is v for p, v in zip(layout.params, new, strict=True)
    )
    assert layout.workspace is None or layout.workspace[0] is old
