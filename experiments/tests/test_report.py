"""The report: rows, table, results.json and plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from curveball_experiments import report as rep


def test_rows_hold_the_median_of_their_values() -> None:
    r = rep.Report("x", "unused")
    r.add_row("p", "o", "m", [3, 1, 2, 10])
    row = r.rows[0]
    assert row == {
        "problem": "p",
        "optimizer": "o",
        "metric": "m",
        "values": [3, 1, 2, 10],
        "median": 2.5,
    }
    assert r.median("p", "o", "m") == 2.5
    assert r.median("p", "o", "other") is None


def test_non_finite_values_are_null_and_left_out_of_the_median() -> None:
    r = rep.Report("x", "unused")
    r.add_row("p", "o", "m", [1.0, float("nan"), 3.0])
    assert r.rows[0]["values"] == [1.0, None, 3.0]
    assert r.rows[0]["median"] == 2.0


def test_table_has_one_line_per_problem_and_optimizer() -> None:
    r = rep.Report("x", "unused")
    for opt in ("A", "B"):
        r.add_row("p", opt, "loss", [1.0, 2.0, 4.0])
        r.add_row("p", opt, "hidden", [1.0])
    r.hidden_metrics.add("hidden")
    lines = r.table().strip().splitlines()
    assert len(lines) == 4
    assert lines[0] == "| problem | optimizer | loss |"
    assert lines[2] == "| p | A | 2 (1–4) |"


def test_thin_indices_keeps_ends_and_bounds_the_count() -> None:
    assert rep.thin_indices(5) == [0, 1, 2, 3, 4]
    idx = rep.thin_indices(10_001)
    assert idx[0] == 0 and idx[-1] == 10_000
    assert len(idx) <= rep.MAX_CURVE_POINTS + 2
    assert idx == sorted(set(idx))


def test_write_produces_json_table_and_plots(tmp_path: Path) -> None:
    r = rep.Report("demo", tmp_path)
    for opt, rate in (("fast", 0.5), ("slow", 0.9)):
        values = []
        for seed in range(3):
            loss = [(rate + 0.01 * seed) ** i for i in range(50)]
            r.add_curve("problem one", opt, loss, [0.01 * i for i in range(50)])
            values.append(loss[-1])
        r.add_row("problem one", opt, "final", values)
    r.notes.append("a note")
    r.check("claim", True, "detail")
    text = r.write()
    assert "| problem one | fast |" in text and "a note" in text
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["experiment"] == "demo"
    for row in results["rows"]:
        assert row["median"] == pytest.approx(statistics.median(row["values"]))
    assert set(results["versions"]) >= {"torch", "curveball"}
    assert (tmp_path / "demo" / "table.md").read_text().startswith("# demo")
    pngs = sorted((tmp_path / "demo").glob("*.png"))
    assert [p.name for p in pngs] == [
        f"{rep.slug('problem one')}_vs_{a}.png" for a in ("iteration", "time")
    ]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slug_is_file_name_safe() -> None:
    assert rep.slug("rosenbrock ε~U[0,1]") == "rosenbrock_eps_u_0_1"


def test_piped_output_gets_progress_lines(capsys) -> None:
    bar = rep.LineProgress(total=4, desc="demo", every=0.0)
    bar.set_postfix_str("CurveBall")
    for _ in range(4):
        bar.update(1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("demo: 4/4 steps (100%)") and "CurveBall" in lines[-1]
    assert len(lines) == 4
    quiet = rep.LineProgress(total=100, desc="demo", every=3600.0)
    for _ in range(99):
        quiet.update(1)
    assert capsys.readouterr().out == ""  # nothing until the interval or the end


def test_curves_are_carried_to_the_end_so_the_median_does_not_jump() -> None:
    np = pytest.importorskip("numpy")
    runs = [
        {"iteration": [0, 1, 2], "loss": [1.0, 0.1, 0.01], "seconds": [0.0, 1.0, 2.0]},
        {"iteration": [0, 1, 2, 3, 4], "loss": [1.0, 0.5, 0.4, 0.3, 0.2],
         "seconds": [0.0, 0.5, 1.0, 1.5, 9.0]},
    ]  # fmt: skip
    grid, loss, seconds = rep._aligned(runs, np)
    assert grid.tolist() == [0, 1, 2, 3, 4]
    assert loss[0, 3:].tolist() == pytest.approx([0.01, 0.01])  # carried, not NaN
    assert seconds[0, 3:].tolist() == [2.0, 2.0]
    assert np.all(np.diff(np.median(seconds, axis=0)) >= 0)  # time never runs backwards
