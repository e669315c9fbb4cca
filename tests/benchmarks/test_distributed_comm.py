"""Smoke test of ``benchmarks.distributed_comm`` with two gloo processes (no timing assertions).

The byte counts are checked against what the method implies: per process and
step, CurveBall hands all-reduce its Δz vector (the parameter bytes) plus a few
scalars, and DDP its gradient buckets (the parameter bytes); alone, CurveBall
communicates nothing.
"""

from __future__ import annotations

import json

from benchmarks import distributed_comm


def test_two_processes_send_the_parameter_bytes(tmp_path):
    out = tmp_path / "comm.json"
    args = ["--world-sizes", "1", "2", "--batch-size", "8", "--steps", "5", "--repeats", "1",
            "--warmup", "0", "--json", str(out)]  # fmt: skip
    distributed_comm.main(args)
    data = json.loads(out.read_text())
    rows = {(r["optimizer"], r["processes"]): r for r in data["rows"]}
    param_bytes = data["parameter_bytes"]
    assert rows[("curveball", 1)]["bytes_per_step"] == 0
    assert rows[("ddp-sgd", 2)]["bytes_per_step"] == param_bytes
    curveball = rows[("curveball", 2)]["bytes_per_step"]
    assert param_bytes < curveball < param_bytes + 100  # Δz, then 7 (or 8) float64 scalars
    assert all(r["step_ms"] > 0 for r in data["rows"])
