"""The race on a tiny budget: well-formed results, every contender placed, the grid's time
as the sum of its trials', missing packages and unreached targets said so (no timing checks)."""

from __future__ import annotations

import copy
import itertools
import json
import math
import sys

import pytest
import torch
from torch import nn

from benchmarks import race


def test_a_tiny_race_reports_every_contender(tmp_path):
    out = tmp_path / "race.json"
    results = race.run(
        ["--tasks", "char-lstm", "--budget", "4", "--eval-every", "2", "--grid", "pre-run",
         "--pre-steps", "1", "--text-chars", "20000", "--json", str(out),
         "--plots", str(tmp_path / "plots"),
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
    for row in task["rows"]:  # the grid's time: every pre-run's seconds, then the chosen run's
        if row["contender"] in task["lr_grids"] and row["seconds_to_target"] is not None:
            pre_runs = sum(task["lr_grids"][row["contender"]]["pre_run_seconds"].values())
            assert row["grid_seconds"] == pytest.approx(pre_runs + row["seconds_to_target"])
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
    assert sizes == [(5, 1 + len(race.LR_GRIDS["adam"]))] * 3  # curveball, Adam's grid
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


TINY = ["--budget", "4", "--eval-every", "2", "--text-chars", "8000", "--batch-size", "8"]


def reach(curve, target):
    """The seconds of a curve's first evaluation after step 0 at or below ``target``."""
    return next((seconds for _, seconds, loss in curve[1:] if loss <= target), None)


def test_the_full_grid_races_every_point_and_sums_the_trials_seconds():
    (task,) = race.run(
        ["--tasks", "char-lstm", *TINY, "--contenders", "curveball", "curveball-tuned", "sgd",
         "adam", "adamw"]
    )  # fmt: skip
    rows = {row["contender"]: row for row in task["rows"]}
    adams = [trial for name in ("adam", "adamw") for trial in rows[name]["trials"]]
    target = min(trial["curve"][-1][2] for trial in adams)
    assert task["target"] == target and task["target_reachable"]
    assert target < rows["adam"]["trials"][0]["curve"][0][2]  # below the initial loss
    for name in ("curveball-tuned", "sgd", "adam", "adamw"):
        row = rows[name]
        assert row["tuned"] and row["runs"] == len(race.LR_GRIDS[name])
        assert [trial["lr"] for trial in row["trials"]] == list(race.LR_GRIDS[name])
        reached = [reach(trial["curve"], target) for trial in row["trials"]]
        whole = [trial["curve"][-1][1] for trial in row["trials"]]  # a run never reaching it
        counted = [w if s is None else s for s, w in zip(reached, whole, strict=True)]
        if any(s is not None for s in reached):
            assert row["grid_seconds"] == pytest.approx(sum(counted), rel=1e-12)
            assert row["seconds_to_target"] == min(s for s in reached if s is not None)
            assert task["lr_grids"][name]["chosen"] == row["lr"]
        else:
            assert row["grid_seconds"] is None and row["seconds_to_target"] is None
    best = rows[task["best_adam"]]
    assert best["time_ratio_to_adam"] == 1.0 and best["grid_ratio_to_adam"] == 1.0
    one = rows["curveball"]  # untuned: its grid is its single run
    assert not one["tuned"] and one["runs"] == 1 and one["trials"] is None
    assert one["grid_seconds"] == one["seconds_to_target"] == reach(one["curve"], target)


NEW_PEERS = {
    "prodigy": "prodigyopt",
    "dadapt-adam": "dadaptation",
    "schedulefree-adamw": "schedulefree",
    "dog": "dog",
    "mechanic": "mechanic_pytorch",
}


def test_the_learning_rate_free_peers_and_muon_have_a_row_each():
    for module in NEW_PEERS.values():
        pytest.importorskip(module)
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    (task,) = race.run(
        ["--tasks", "char-transformer", *TINY, "--contenders", "adam", "muon", *NEW_PEERS]
    )
    transformer = {row["contender"]: row for row in task["rows"]}
    assert list(transformer) == ["adam", "muon", *NEW_PEERS]
    for name in NEW_PEERS:
        row = transformer[name]
        assert row["error"] is None and not row["tuned"] and row["runs"] == 1
        assert [step for step, _, _ in row["curve"]] == [0, 2, 4]
        assert all(math.isfinite(loss) for _, _, loss in row["curve"])
    muon = transformer["muon"]
    assert muon["error"] is None and muon["tuned"] and muon["lr"] in race.LR_GRIDS["muon"]
    assert [trial["lr"] for trial in muon["trials"]] == list(race.LR_GRIDS["muon"])
    assert all(math.isfinite(trial["final_loss"]) for trial in muon["trials"])


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = race.CharTransformer()
    hidden = race.transformer_hidden_matrices(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 and names[id(p)].startswith("encoder.") for p in hidden)
    assert len(hidden) == 4 * 2  # QKV, output projection, two feed-forward layers; 2 blocks
    rest = {names[id(p)] for p in model.parameters()} - {names[id(p)] for p in hidden}
    assert {"embedding.weight", "position", "head.weight", "head.bias"} <= rest
    (lstm,) = race.run(["--tasks", "char-lstm", *TINY, "--contenders", "adam", "muon"])
    assert [row["contender"] for row in lstm["rows"]] == ["adam"]  # the transformer's only


def test_schedule_free_is_measured_at_its_average_with_batch_norm_recomputed():
    schedulefree = pytest.importorskip("schedulefree")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    x, t = torch.randn(40, 3), torch.randint(0, 2, (40,))
    opt = schedulefree.AdamWScheduleFree(model.parameters())
    opt.train()
    step = race.gradient_step(opt, model)
    for start in range(0, 40, 8):
        step(x[start : start + 8], t[start : start + 8])
    before = copy.deepcopy(model.state_dict())  # the gradient point y, y's statistics
    loss = race.schedule_free_loss(opt, model, x, t, batch_size=8)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # y is back
    assert opt.param_groups[0]["train_mode"] and model.training
    model.load_state_dict(before)  # the README's procedure, by hand: x, then 50 batches
    opt.eval()
    model.train()
    with torch.no_grad():
        for batch in itertools.islice(torch.split(x, 8), 50):
            model(batch)
    model.eval()
    assert loss == race.training_loss(model, x, t)
    opt.train()


def test_a_missing_package_skips_its_contender_and_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import prodigyopt now fails
    (task,) = race.run(["--tasks", "char-lstm", *TINY, "--contenders", "adam", "prodigy"])
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if "prodigy skipped" in s)
    assert "'prodigyopt' is not installed" in line and "pip install curveball[race]" in line
    adam, prodigy = task["rows"]
    assert adam["error"] is None and adam["seconds_to_target"] is not None
    assert prodigy["contender"] == "prodigy" and prodigy["error"].startswith("skipped")


def test_a_target_no_run_reaches_within_the_budget_reads_not_reached(monkeypatch, capsys):
    monkeypatch.setitem(race.LR_GRIDS, "adam", (10.0,))  # one step at lr 10 raises the loss
    (task,) = race.run(
        ["--tasks", "char-lstm", "--budget", "1", "--eval-every", "1", "--text-chars", "8000",
         "--contenders", "curveball", "adam"]
    )  # fmt: skip
    assert not task["target_reachable"] and task["target"] > task["initial_loss"]
    for row in task["rows"]:
        assert row["steps_to_target"] is None and row["seconds_to_target"] is None
        assert row["grid_seconds"] is None
        ratios = ("time_ratio_to_adam", "step_ratio_to_adam", "grid_ratio_to_adam")
        assert all(row[key] is None for key in ratios)
    table = race.markdown([task])
    cells = [cell.strip() for line in table.splitlines() if line.startswith("| char-lstm")
             for cell in line.split("|")]  # fmt: skip
    assert cells.count("not reached") == 3 * 2  # steps, seconds and grid seconds, each row
    assert not {"inf", "nan", "-inf"} & {cell.lower() for cell in cells}
    assert "no contender reached the target within the budget (1 steps)" in table
    assert "no contender reached the target" in capsys.readouterr().out


def test_the_summary_sets_curveball_beside_the_fastest_peer_and_both_adam_times():
    rows = [
        {"contender": "curveball", "error": None, "seconds_to_target": 1.0},
        {"contender": "prodigy", "error": None, "seconds_to_target": 3.0},
        {"contender": "mechanic", "error": None, "seconds_to_target": 2.5},
        {"contender": "dog", "error": None, "seconds_to_target": None},
    ]
    results = [
        {"task": "t", "adam_seconds": 2.0, "adam_grid_seconds": 8.0, "rows": rows},
        {"task": "u", "adam_seconds": None, "adam_grid_seconds": None, "rows": rows[3:]},
    ]
    lines = race.summary(results).splitlines()
    assert lines[2] == "| t | 1.00 | mechanic (2.50) | 2.00 | 8.00 | 0.50 | 0.12 |"
    assert lines[3] == "| u | not reached | none reached it | not reached | not reached | — | — |"
