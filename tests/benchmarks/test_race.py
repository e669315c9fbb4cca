"""The race on a tiny budget: well-formed results, every contender placed (no timing checks)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import race


def test_a_tiny_race_reports_every_contender(tmp_path):
    out = tmp_path / "race.json"
    results = race.run(
        ["--tasks", "char-lstm", "--budget", "4", "--eval-every", "2", "--pre-steps", "1",
         "--text-chars", "20000", "--json", str(out), "--plots", str(tmp_path / "plots"),
         "--contenders", "curveball", "curveball-minibatch", "curveball-paper-damping",
         "curveball-tuned", "sgd", "adam", "adamw", "soap", "sophiah"]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(results))
    (task,) = results
    assert task["task"] == "char-lstm" and math.isfinite(task["target"])
    names = [row["contender"] for row in task["rows"]]
    assert names == [
        "curveball", "curveball-minibatch", "curveball-paper-damping", "curveball-tuned", "sgd",
        "adam", "adamw", "soap", "sophiah",
    ]  # fmt: skip
    for row in task["rows"]:
        if row["error"] is None:
            assert [step for step, _, _ in row["curve"]] == [0, 2, 4]
            assert row["step_ms"] > 0
            counted = row["contender"].startswith("curveball")
            assert (row["skipped_steps"] == {}) if counted else (row["skipped_steps"] is None)
    best = next(r for r in task["rows"] if r["contender"] == task["best_adam"])
    assert best["steps_to_target"] is not None and best["time_ratio_to_adam"] == 1.0
    assert set(task["lr_grids"]) == {"curveball-tuned", "sgd", "adam", "adamw"}
    tuned = task["lr_grids"]["curveball-tuned"]
    assert tuned["chosen"] in race.LR_GRIDS["curveball-tuned"]
    assert tuned["pre_run_loss"][tuned["chosen"]] == min(tuned["pre_run_loss"].values())
    assert (tmp_path / "plots" / "char-lstm.png").stat().st_size > 0


def test_the_batch_size_applies_to_every_task_and_contender(monkeypatch):
    sizes = []
    lockstep = race.lockstep_round

    def recording(contenders, xb, tb):
        sizes.append((len(xb), len(contenders)))
        lockstep(contenders, xb, tb)

    monkeypatch.setattr(race, "lockstep_round", recording)
    results = race.run(
        ["--tasks", "char-lstm", "--budget", "3", "--eval-every", "3", "--pre-steps", "1",
         "--text-chars", "20000", "--batch-size", "5", "--contenders", "curveball", "adam"]
    )  # fmt: skip
    assert sizes == [(5, 2)] * 3
    assert race.TASKS["char-lstm"].batch_size == 32  # the task itself is left as it is
    assert [row["contender"] for row in results[0]["rows"]] == ["curveball", "adam"]


def test_a_batch_size_below_one_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        race.parse_args(["--batch-size", "0", "--contenders", "adam"])
    assert "--batch-size" in capsys.readouterr().err


def test_the_lockstep_counts_a_curveball_contenders_skipped_steps_by_reason():
    class Last:
        skipped, reason = True, "rejected: the loss rose on the step's batch"

    def step(x, t):
        return None

    step.optimizer = type("Optimizer", (), {"last": Last})()
    c = race.Contender("curveball", None, step)
    for _ in range(3):
        race.lockstep_round([c], None, None)
    assert c.skipped == {Last.reason: 3} and len(c.times) == 3


def test_the_batch_order_is_shared_and_covers_epochs():
    order = race.batches(10, 4, 5, seed=0)
    assert len(order) == 5 and all(len(b) == 4 for b in order)
    assert sorted(torch_cat(order[:2])) == sorted(set(torch_cat(order[:2])))  # no repeats
    assert [b.tolist() for b in order] == [b.tolist() for b in race.batches(10, 4, 5, seed=0)]


def torch_cat(batches):
    return [int(i) for b in batches for i in b]
