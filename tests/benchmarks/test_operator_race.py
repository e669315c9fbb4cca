"""The neural-operator race: a ``--quick`` run's outputs, the losses against their closed
forms, the scaled learning-rate schedule, the batch order, and failures kept in their rows."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from benchmarks import operator_data
from benchmarks import operator_race as race


def test_a_quick_race_writes_json_markdown_and_plots_with_a_row_per_contender(tmp_path):
    pytest.importorskip("neuralop")
    out = tmp_path / "out"
    argv = ["--quick", "--cache", str(tmp_path / "cache"), "--json", str(out / "race.json"),
            "--markdown", str(out / "race.md"), "--plots", str(out / "plots")]  # fmt: skip
    threads = torch.get_num_threads()
    results = race.run(argv)
    assert torch.get_num_threads() == threads  # --quick races on one thread, then restores
    saved = json.loads((out / "race.json").read_text())
    assert saved["results"] == json.loads(json.dumps(results))
    assert saved["settings"]["budget"] == 0.3 and saved["settings"]["size"] == "quick"
    report = (out / "race.md").read_text()
    assert [r["problem"] for r in results] == ["burgers", "darcy"]
    for r in results:
        assert (out / "plots" / f"{r['problem']}.png").stat().st_size > 0
        assert f"### {r['problem']}:" in report
        assert [row["contender"] for row in r["rows"]] == list(race.CONTENDERS)
        for row in r["rows"]:
            assert f"| {row['contender']} |" in report
            if row["error"] is None:
                assert row["steps"] >= 1 and row["seconds"] >= 0.3 and row["step_ms"] > 0
                assert math.isfinite(row["final_test_error"])
                seconds = [s for _, s, _ in row["curve"]]
                assert seconds[0] == 0.0 and seconds == sorted(seconds)
            else:
                assert row["error"] in report
        grid = r["adam_grid"]
        finals = grid["final_test_error"]
        assert len(grid["runs"]) == len(race.ADAM_GRID)
        assert finals[str(grid["chosen"])] == min(finals.values())
        family = [row for row in r["rows"] if row["contender"] in race.ADAM_FAMILY]
        assert r["target"] == min(row["final_test_error"] for row in family)
        best = next(row for row in r["rows"] if row["contender"] == r["best_adam"])
        assert best["time_ratio_to_adam"] == 1.0
        assert r["model"]["parameters"]["scalars"]["complex64"] > 0
        assert [n.split(":")[0] for n in r["notes"]] == ["schedulefree-adamw"]
        assert "Note — schedulefree-adamw" in report
        assert r["paper"]["test_error"] in race.PROBLEMS[r["problem"]].paper.values()
        assert r["data"]["train"] == operator_data.SIZES["quick"][r["problem"]].train


def test_the_relative_losses_equal_their_closed_forms():
    torch.manual_seed(0)
    y, t = (
        torch.randn(3, 1, 4, 5, dtype=torch.float64),
        torch.randn(3, 1, 4, 5, dtype=torch.float64),
    )
    norms = [
        (math.sqrt(((y[i] - t[i]) ** 2).sum()), math.sqrt((t[i] ** 2).sum())) for i in range(3)
    ]
    relative = [d / n for d, n in norms]
    assert float(race.relative_l2(y, t)) == pytest.approx(sum(relative) / 3, rel=1e-12)
    assert float(race.relative_l2(y, t, "sum")) == pytest.approx(sum(relative), rel=1e-12)
    squared = sum((d / n) ** 2 for d, n in norms) / 3
    assert float(race.squared_relative_l2(y, t)) == pytest.approx(squared, rel=1e-12)
    assert float(race.relative_l2(1.5 * t, t)) == pytest.approx(0.5, rel=1e-12)


def test_the_squared_relative_error_is_quadratic_with_a_diagonal_hessian():
    torch.manual_seed(1)
    t = torch.randn(2, 1, 3, dtype=torch.float64)
    y = torch.randn(2, 1, 3, dtype=torch.float64)
    hessian = torch.autograd.functional.hessian(lambda p: race.squared_relative_l2(p, t), y)
    weights = 2.0 / (2 * t.flatten(1).pow(2).sum(1))  # 2 / (B ‖t_i‖²)
    expected = torch.diag(weights.repeat_interleave(3)).reshape(2, 1, 3, 2, 1, 3)
    assert torch.allclose(hessian, expected, rtol=1e-12, atol=0)


def test_the_fno_schedule_halves_the_learning_rate_at_every_fifth_of_the_budget():
    lrs = [race.fno_learning_rate(p) for p in (0.0, 0.199, 0.2, 0.45, 0.799, 0.8, 0.999, 1.3)]
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4, 6.25e-5, 6.25e-5, 6.25e-5])


def test_the_batch_order_is_seeded_and_each_epoch_a_permutation():
    batch = race.batch_order(50, 20, seed=3)
    first = torch.cat([batch(0), batch(1)])  # two full batches per epoch, 10 pairs dropped
    assert len(first.unique()) == 40 and all(len(batch(k)) == 20 for k in range(6))
    assert torch.equal(batch(4), race.batch_order(50, 20, seed=3)(4))
    assert not torch.equal(batch(0), batch(2))  # the next epoch is shuffled anew
    assert len(race.batch_order(8, 20, seed=0)(5)) == 8  # the batch never exceeds the data


def _tiny_data() -> race.Data:
    x, y = torch.randn(12, 1, 8), torch.randn(12, 1, 8)
    spec = operator_data.DataSpec("burgers", 8, 4, fine=8, resolution=8)
    return race.Data(x[:8], y[:8], x[8:], y[8:], spec, generation_seconds=0.0, cached=True)


def test_a_contender_that_fails_keeps_its_row_and_the_others_race_on(monkeypatch):
    def refuse(model):
        raise RuntimeError("no complex parameters\nsecond line")

    monkeypatch.setattr(race, "CurveBall", refuse)
    failed = race.make_contender("curveball", nn.Conv1d(1, 1, 3, padding=1))
    assert failed.error == "RuntimeError: no complex parameters" and failed.step is None
    crashing = race.make_contender("adam", nn.Conv1d(1, 1, 3, padding=1), lr=1e-3)
    crashing.step = lambda x, t, progress: (_ for _ in ()).throw(ValueError("step broke"))
    working = race.make_contender("adam", nn.Conv1d(1, 1, 3, padding=1), lr=1e-3)
    args = race.parse_args(["--budget", "0.05", "--batch-size", "4", "--eval-points", "2"])
    race.race([failed, crashing, working], _tiny_data(), args, torch.device("cpu"))
    assert crashing.error == "ValueError: step broke" and crashing.times == []
    assert working.error is None and working.seconds >= 0.05 and len(working.curve) >= 2
    assert working.curve[0][0] == 0 and working.curve[-1][0] == len(working.times)
