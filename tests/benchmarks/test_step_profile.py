"""The stage profile: every labelled stage of a step is found, and the stages fit in the step."""

from __future__ import annotations

from benchmarks import step_profile


def test_every_stage_of_a_step_is_profiled_and_they_fit_in_the_step():
    rows = step_profile.run(
        [
            "--tasks",
            "char-lstm",
            "--steps",
            "2",
            "--warmup",
            "4",
            "--text-chars",
            "20000",
            "--loss",
            "closed",
            "autograd",
        ]
    )  # fmt: skip  (steps 5 and 6: the 5th has a trust-region test)
    assert [row["loss"] for row in rows] == ["closed", "autograd"]
    for row in rows:
        assert set(row["stages_ms"]) == set(step_profile.SHORT)
        stages = dict(row["stages_ms"])
        assert stages.pop("inner") == 0.0  # one iteration per step at the defaults
        assert all(ms > 0 for ms in stages.values()), row["stages_ms"]
        assert sum(row["stages_ms"].values()) <= row["step_ms"] * (1 + 1e-9)
        assert len(row["top_operators"]) == 3
    assert "| char-lstm | autograd |" in step_profile.markdown(rows)
