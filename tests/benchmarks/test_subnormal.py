"""Smoke test of ``benchmarks.subnormal`` on synthetic images (no timing assertions)."""

from __future__ import annotations

import json

from benchmarks import subnormal


def test_the_swept_run_holds_no_subnormal_z_and_the_table_names_both(tmp_path):
    out = tmp_path / "r.json"
    args = ["--synthetic", "--steps", "12", "--batch-size", "16", "--threads", "1"]
    result = subnormal.run([*args, "--json", str(out), "--markdown", str(tmp_path / "t.md")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["contender"]: r for r in result["rows"]}
    assert set(rows) == set(subnormal.CONTENDERS)
    assert rows["swept"]["subnormal_z"] == 0
    assert all(r["first_half_ms"] > 0 and r["second_half_ms"] > 0 for r in rows.values())
    table = (tmp_path / "t.md").read_text()
    assert "| swept |" in table and "| unswept |" in table


def test_synthetic_border_pixels_are_zero_in_most_images():
    x, t = subnormal.synthetic_images(500, seed=0)
    border = x[:, 0, 0, :]
    touched = (border != 0).any(dim=1).float().mean().item()
    assert 0.0 < touched < 0.06 and x[:, 0, 10:18, 10:18].ne(0).all()
    assert t.min() >= 0 and t.max() < 10
