"""The rejection benchmark on its data-free problem: with a test at every step on one fixed
batch, rejecting every uphill step makes the loss non-increasing; the paper's rule does not."""

from __future__ import annotations

from benchmarks import rejection


def test_rejecting_uphill_steps_keeps_the_loss_from_rising_on_a_fixed_batch():
    rows = rejection.run(["--problems", "concave", "--concave-steps", "12"])
    kept, rejected = rows
    assert (kept["reject_uphill"], rejected["reject_uphill"]) == (False, True)
    assert kept["curve"][0] == rejected["curve"][0]  # the same start
    assert kept["highest"] > kept["curve"][0] and kept["rejected"] == 0
    curve = rejected["curve"]
    assert all(b <= a for a, b in zip(curve, curve[1:], strict=False))
    assert rejected["rejected"] > 0 and curve[-1] < curve[0]
