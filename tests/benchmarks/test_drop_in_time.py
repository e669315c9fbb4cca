"""Smoke test of ``benchmarks.drop_in_time`` (well-formed rows, no timing assertions)."""

from __future__ import annotations

import json
import math

from benchmarks import drop_in_time


def test_one_round_gives_a_row_per_contender(tmp_path):
    out = tmp_path / "rows.json"
    rule = drop_in_time.lean_rules.LeanTangents._recurrent
    supported = drop_in_time.lean_rules.multi_head_rule.supported
    rows = drop_in_time.run(["--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert drop_in_time.lean_rules.LeanTangents._recurrent is rule  # the native scope undone
    assert drop_in_time.lean_rules.multi_head_rule.supported is supported  # and the explicit one
    assert json.loads(out.read_text()) == rows
    assert [(r["workload"], r["method"]) for r in rows] == [
        (w, m) for w, methods in drop_in_time.METHODS.items() for m in methods
    ]
    assert all(math.isfinite(r["median_ms"]) and r["median_ms"] > 0 for r in rows)
