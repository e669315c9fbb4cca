"""Smoke test of ``benchmarks/step_size_interval.py`` on its synthetic task (no timing checks)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_size_interval.py"


def _load_script():
    name = "_benchmark_step_size_interval"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_quick_run_writes_results_table_and_plot(tmp_path):
    script = _load_script()
    result = script.run(["--quick", "--intervals", "1", "3", "--out", str(tmp_path)])
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
