"""The sweep that keeps ``z`` and ``v`` out of the subnormal range: its floors, and a run
along a direction whose gradient vanishes, with and without it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curveball import CurveBall, _subnormal
from curveball._subnormal import sweep_

FLOATS = (torch.float32, torch.float64, torch.bfloat16)


def subnormal_count(t: torch.Tensor) -> int:
    t = torch.view_as_real(t) if t.is_complex() else t
    tiny = torch.finfo(t.dtype).tiny
    return int(((t != 0) & (t.abs() < tiny)).sum())


@pytest.mark.parametrize("dtype", FLOATS)
def test_z_entries_below_the_square_root_of_tiny_are_zeroed_the_rest_kept(dtype):
    floor = torch.finfo(dtype).tiny ** 0.5
    z = torch.tensor([floor * 0.5, -floor * 0.5, floor * 2, -floor * 2, 0.3, -1e-3]).to(dtype)
    before = z.clone()
    sweep_([z])
    assert torch.equal(z[:2], torch.zeros(2, dtype=dtype))
    assert torch.equal(z[2:], before[2:])


def test_complex_z_is_swept_as_its_real_pairs():
    floor = torch.finfo(torch.float32).tiny ** 0.5
    z = torch.tensor([complex(floor / 4, 0.5), complex(0.25, -floor / 4)], dtype=torch.complex64)
    sweep_([z])
    assert torch.equal(z, torch.tensor([0.5j, 0.25], dtype=torch.complex64))


def test_float16_is_left_alone():
    z = torch.tensor([1e-7, 6e-8, 0.5], dtype=torch.float16)  # float16 subnormals
    before = z.clone()
    sweep_([z], [z.clone().abs()], 1e-8)
    assert torch.equal(z, before)


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from((torch.float32, torch.float64)),
    eps=st.floats(1e-10, 1e-2),
    fraction=st.floats(0.0, 1.0, exclude_max=True),
)
def test_a_zeroed_average_leaves_the_denominator_exactly_as_it_was(dtype, eps, fraction):
    """Below its floor, ``√v + ε`` rounds to ``ε``: zeroing ``v`` changes no ``d``."""
    v = torch.tensor([(eps * torch.finfo(dtype).eps / 4) ** 2 * fraction], dtype=dtype)
    denominator = v.sqrt() + eps
    sweep_([torch.zeros(1, dtype=dtype)], [v], eps)
    assert v.item() == 0.0 or subnormal_count(v) == 0
    assert torch.equal(v.sqrt() + eps, denominator)


def test_averages_above_their_floor_are_kept():
    eps = 1e-8
    v = torch.tensor([1e-20, 1e-12, 0.1], dtype=torch.float32)
    before = v.clone()
    sweep_([torch.zeros(3)], [v], eps)
    assert torch.equal(v, before)


def test_the_sweep_runs_every_interval_steps():
    steps = range(1, 4 * _subnormal.INTERVAL + 1)
    assert [s for s in steps if _subnormal.due(s)] == [k * _subnormal.INTERVAL for k in range(1, 5)]


def dying_feature_run(steps: int) -> list[int]:
    """A linear model whose first input feature is random for three steps and 0 from then on:
    the weights it feeds get no gradient, ``Δz = λ z`` along them, and ``z`` decays there
    geometrically, by ρ − βλ = 0.495 per step (fixed ρ, β and λ make the rate known).
    Returns the number of subnormal entries of ``z`` after each step."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    fixed = dict(momentum=0.5, beta=0.1, auto_lambda=False, lambd=0.05)
    opt = CurveBall(model, precondition=False, **fixed)
    x = torch.randn(32, 4)
    t = torch.randn(32, 3)
    counts = []
    for step in range(steps):
        if step == 3:
            x[:, 0] = 0.0
        opt.step(lambda: model(x), lambda y: 0.5 * ((y - t) ** 2).sum(-1).mean())
        counts.append(sum(subnormal_count(opt.state[p]["z"]) for p in model.parameters()))
    return counts


def test_z_along_a_dead_direction_never_turns_subnormal(monkeypatch):
    steps = 160  # from 0.04 to below float32's smallest subnormal by 0.495 a step
    assert max(dying_feature_run(steps)) == 0
    # the oracle for the premise: without the sweep the same run holds subnormals
    monkeypatch.setattr(_subnormal, "due", lambda step: False)
    assert max(dying_feature_run(steps)) > 0
