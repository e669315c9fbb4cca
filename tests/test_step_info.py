"""StepInfo: what a step did, as plain floats for any tracker."""

from __future__ import annotations

import math

from cases import CASES, cross_entropy

from curveball import CurveBall, StepInfo


def test_as_dict_gives_plain_floats_with_nan_for_what_was_not_measured():
    info = StepInfo(3, 0.5, 0.9, 1.2, 1.0, 0.99, -0.1, trust_ratio=None, skipped=True, reason="x")
    out = info.as_dict()
    assert all(type(v) is float for v in out.values())
    assert out["step"] == 3.0 and out["skipped"] == 1.0 and out["refreshed"] == 1.0
    assert math.isnan(out["trust_ratio"])
    assert "reason" not in out and "engine" not in out


def test_a_step_reports_what_it_did():
    model, x, t = CASES["mlp"].make()
    opt = CurveBall(model, lambda_interval=2, lambda_thresholds=(0.5, 1.1))
    for _ in range(2):
        opt.step(lambda: model(x), cross_entropy(t))
    info = opt.last
    assert info.step == 2 and info.engine == "forward" and not info.skipped
    assert info.trust_ratio is not None and info.next_lambd != info.lambd
    assert info.predicted_change < 0.0
