"""The fault rollback stage: what a skipped or rejected step puts back and changes."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from cases import CASES

from curveball import _damping, _layout
from curveball._rollback import Rollback, reject, skip
from curveball._state import CurveBallState
from curveball._step_info import StepInfo

HYPER = {"lambda_factor": 0.9, "lambda_interval": 5}


def record(reason: str) -> StepInfo:
    return StepInfo(3, 1.0, 0.5, 0.2, 0.4, 0.4, -0.1, reason=reason)


def test_a_skip_raises_lambda_by_one_over_omega_and_says_so():
    state = CurveBallState(lambd=0.4)
    info, message = skip(record("non-finite Δz"), state, HYPER)
    assert info.skipped and state.lambd == pytest.approx(0.4 / _damping.omega(0.9, 5))
    assert info.next_lambd == state.lambd and "non-finite Δz" in message


def test_a_float16_overflow_halves_the_scale_and_keeps_lambda():
    state = CurveBallState(lambd=0.4, loss_scale=1024.0, scaled_steps=7)
    info, message = skip(record("float16 overflow of the loss scale 1024"), state, HYPER)
    assert (state.lambd, state.loss_scale, state.scaled_steps) == (0.4, 512.0, 0)
    assert info.skipped and message == ""


def test_a_rejection_forgets_the_step_sizes():
    state = CurveBallState(lambd=0.8, rho=0.5, beta=0.2)
    info, message = reject(record(None), 1.3, state)
    assert info.skipped and state.sizes is None and "rose from 1 to 1.3" in message


def test_buffers_and_the_kept_point_come_back_exactly():
    model, x, _ = CASES["bn_mlp"].make()
    layout = _layout.build([{"params": list(model.parameters())}], model, "auto", print, None)
    _layout.attach_state(layout, defaultdict(dict), False)
    buffers = [b.clone() for b in model.buffers()]
    rollback = Rollback(layout)
    model(x)  # a training-mode pass moves the running statistics
    assert not all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers, strict=True))
    rollback.buffers()
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers, strict=True))
    for z in layout.zs:
        z.fill_(2.0)
    kept = [t.detach().clone() for t in (*layout.zs, *layout.params)]
    rollback.keep_point()
    with torch.no_grad():
        for t in (*layout.zs, *layout.params):
            t.add_(1.0)
    rollback.point()
    assert all(torch.equal(a, b) for a, b in zip((*layout.zs, *layout.params), kept, strict=True))
    with torch.no_grad():
        for p in layout.params:
            p.add_(1.0)
    rollback.weights_and_restart()
    assert all(torch.equal(a, b) for a, b in zip(layout.params, kept[len(layout.zs):],
                                                  strict=True))  # fmt: skip
    assert all(not z.any() for z in layout.zs)
