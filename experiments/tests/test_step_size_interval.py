"""Smoke test of ``curveball_experiments.step_size_interval`` on a synthetic task (no timing)."""

from __future__ import annotations

import json
import math

from curveball_experiments import step_size_interval


def test_quick_run_writes_results_table_and_plot(tmp_path):
    result = step_size_interval.run(["--quick", "--intervals", "1", "3", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == json.loads(json.dumps(result))
    assert [r["k"] for r in data["rows"]] == [1, 3]
    for row in data["rows"]:
        assert len(row["train_loss"]) == len(row["val_accuracy"]) == data["epochs"] + 1
        assert all(math.isfinite(v) for v in row["train_loss"])
        assert row["train_loss"][-1] < row["train_loss"][0]  # it trains
        assert row["step_ms"] > 0
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == 2 + len(data["rows"])
    assert (tmp_path / "loss.png").stat().st_size > 0
