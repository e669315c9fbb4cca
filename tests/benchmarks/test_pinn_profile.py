"""The PINN step profile: the preset's inner iterations and preconditioner are found, the
stages fit in the step, and ENGD is timed in the race's form for the task's size."""

from __future__ import annotations

from benchmarks import pinn_profile
from curveball import FULL_BATCH_DEFAULTS


def test_the_deep_task_profiles_its_inner_iterations_against_the_woodbury_engd():
    rows = pinn_profile.run(["--tasks", "poisson5d-deep", "--quick", "--steps", "2"])
    (row,) = rows
    stages = row["stages_ms"]
    assert row["parameters"] == 10_065 and row["engd"] == "engd-woodbury"  # over 4,096
    assert row["inner_steps"] == FULL_BATCH_DEFAULTS["inner_steps"]
    assert all(ms > 0 for ms in stages.values()), stages
    assert sum(stages.values()) <= row["step_ms"] * (1 + 1e-9)
    assert row["engd_step_ms"] > 0
    assert "| poisson5d-deep | 10,065 |" in pinn_profile.markdown(rows)


def test_a_small_net_takes_the_exact_solve_and_the_dense_engd():
    (row,) = pinn_profile.run(["--tasks", "poisson2d", "--quick", "--steps", "1"])
    assert row["engd"] == "engd" and row["inner_steps"] == 1  # solver "exact": one solve
    assert row["stages_ms"]["inner"] == 0.0 and row["stages_ms"]["precond."] > 0
    assert "| — |" in pinn_profile.markdown([row])  # no per-iteration cost without iterations
