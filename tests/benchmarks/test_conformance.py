"""Smoke test of ``benchmarks.conformance``: its table reports every family of the zoo."""

from __future__ import annotations

from benchmarks import conformance
from benchmarks.zoo import ZOO


def test_table_has_a_row_per_family(monkeypatch):
    monkeypatch.setattr(conformance, "ZOO", {k: ZOO[k] for k in ("mlp", "multi-head attention")})
    rows = conformance.main(["--steps", "60"])
    assert [r["family"] for r in rows] == ["mlp", "multi-head attention"]
    assert all(r["engine"] == "forward" and r["newton_error"] < 1e-6 for r in rows)
    table = conformance.markdown(rows, 60)
    assert table.count("\n") == 1 + len(rows)
