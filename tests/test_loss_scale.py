"""Mixed precision: bf16 autocast, and float16 with the dynamic scale of the backward pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import CASES

from curveball import CurveBall
from curveball._loss_scale import GROWTH_INTERVAL, after_finite, float16_in_use


def run(model, x, t, steps, opt=None, scale=1.0, autocast=None):
    opt = opt or CurveBall(model)
    losses = []
    for _ in range(steps):
        context = (
            torch.autocast("cpu", dtype=autocast)
            if autocast
            else torch.autocast("cpu", enabled=False)
        )
        with context:
            loss, _ = opt.step(lambda: model(x), lambda y: scale * F.cross_entropy(y.float(), t))
        losses.append(loss.item() / scale)
    return opt, losses


def test_bf16_autocast_trains_like_float32():
    model, x, t = CASES["cnn_bn"].make(batch=32, dtype=torch.float32)
    _, reference = run(model, x, t, 10)
    model, x, t = CASES["cnn_bn"].make(batch=32, dtype=torch.float32)
    opt, losses = run(model, x, t, 10, autocast=torch.bfloat16)
    assert not opt.last.skipped and losses[-1] < 0.6 * losses[0]
    assert losses[-1] == pytest.approx(reference[-1], rel=0.05)


@pytest.mark.parametrize(
    "autocast", [None, torch.float16], ids=["fp16 parameters", "fp16 autocast"]
)
def test_float16_steps_use_the_loss_scale_and_train(autocast):
    dtype = torch.float16 if autocast is None else torch.float32
    model, x, t = CASES["mlp"].make(batch=32, dtype=dtype)
    tiny = 2.0**-20  # a loss this small underflows float16's backward pass unscaled
    opt, losses = run(model, x, t, 8, CurveBall(model, lambd=tiny), tiny, autocast)
    assert opt.curveball_state.scaled_steps == 8
    assert losses[-1] < 0.9 * losses[0]
    model, x, t = CASES["mlp"].make(batch=32, dtype=dtype)
    unscaled = CurveBall(model, lambd=tiny)  # λ scales with the loss: the same method
    unscaled.curveball_state.loss_scale = 1.0
    _, stuck = run(model, x, t, 8, opt=unscaled, scale=tiny, autocast=autocast)
    assert stuck[-1] > losses[-1]  # the scale is what makes the difference


def test_an_overflowing_scale_is_halved_without_raising_lambda():
    model, x, t = CASES["mlp"].make(batch=32, dtype=torch.float16)
    opt = CurveBall(model)
    opt.curveball_state.loss_scale = 2.0**40  # overflows float16 (max 65504) at once
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda: model(x), lambda y: F.cross_entropy(y.float(), t))
    assert opt.last.skipped and opt.last.reason.startswith("float16 overflow")
    assert opt.lambd == 0.1 and opt.curveball_state.loss_scale == 2.0**39
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    for _ in range(40):
        opt.step(lambda: model(x), lambda y: F.cross_entropy(y.float(), t))
        if not opt.last.skipped:
            break
    assert not opt.last.skipped and opt.lambd == 0.1
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_the_scale_grows_after_a_run_of_finite_steps():
    scale, count = 1024.0, 0
    for _ in range(GROWTH_INTERVAL - 1):
        scale, count = after_finite(scale, count)
    assert scale == 1024.0
    assert after_finite(scale, count) == (2048.0, 0)


def test_the_scale_is_only_active_with_float16():
    p32, p16 = torch.zeros(2), torch.zeros(2, dtype=torch.float16)
    assert not float16_in_use([p32]) and float16_in_use([p32, p16])
    with torch.autocast("cpu", dtype=torch.float16):
        assert float16_in_use([p32])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not float16_in_use([p32])
