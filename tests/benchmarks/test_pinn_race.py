"""The PINN race on a tiny budget: well-formed JSON, markdown and plot, a row for every
contender, shared starting weights and points, honest thresholds (no timing checks)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import pinn_race
from benchmarks.pdes import TASKS


@pytest.fixture(autouse=True)
def restore_threads():
    """The race sets the thread count (``--threads``); give the next test its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("pinn")
    threads = torch.get_num_threads()
    try:
        results = pinn_race.run(["--quick", "--tasks", "poisson2d", "--threads", "1",
                                 "--json", str(out / "race.json"), "--markdown",
                                 str(out / "race.md"), "--plots", str(out / "plots")])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return out, results


def test_a_quick_race_writes_json_markdown_and_a_plot(quick):
    out, results = quick
    saved = json.loads((out / "race.json").read_text(), parse_constant=_refuse)
    assert saved["results"] == json.loads(json.dumps(results))
    assert saved["settings"]["quick"] and saved["settings"]["tasks"] == ["poisson2d"]
    assert (out / "plots" / "poisson2d.png").stat().st_size > 0
    text = (out / "race.md").read_text()
    assert text.startswith("### poisson2d") and "inf" not in text and "nan" not in text
    table = [line for line in text.splitlines() if line.startswith("| ")][2:]
    assert [line.split(" | ")[0][2:].split(" (lr")[0] for line in table] == list(
        pinn_race.CONTENDERS
    )


def _refuse(constant: str):
    raise ValueError(f"not JSON: {constant}")


def test_every_contender_has_a_row_and_a_coherent_curve(quick):
    (task,) = quick[1]
    assert [row["contender"] for row in task["rows"]] == list(pinn_race.CONTENDERS)
    assert task["parameters"] == 257
    starts = set()
    for row in task["rows"]:
        if not row["curve"]:
            assert row["error"].startswith("skipped")
            continue
        steps, seconds = [p[0] for p in row["curve"]], [p[1] for p in row["curve"]]
        assert steps == sorted(set(steps)) and seconds == sorted(seconds)
        assert steps[0] == 0 and steps[-1] == row["steps"]
        starts.add(tuple(row["curve"][0][2:]))
        for threshold in pinn_race.THRESHOLDS:
            assert row["time_to"][f"{threshold:.0e}"] == _first_time(row["curve"], threshold)
    assert len(starts) == 1  # every contender starts from the same weights


def _first_time(curve, threshold):
    hits = [s for _, s, rel, _ in curve if rel is not None and rel <= threshold]
    return hits[0] if hits else None


def test_the_baselines_run_and_lower_the_error(quick):
    rows = {row["contender"]: row for row in quick[1][0]["rows"]}
    for name in ("engd", "engd-woodbury", "hessian-free", "adam", "lbfgs", "adam-lbfgs"):
        row = rows[name]
        assert row["error"] is None, (name, row["error"])
        assert row["steps"] > 0 and row["final_rel_l2"] is not None, name
        if row["steps"] > 1:  # the training loss (not always the error, early on) goes down
            assert row["final_loss"] < row["first_loss"], name
    assert rows["engd"]["published_abs_l2"] == 6.2e-8
    assert rows["curveball"]["published_abs_l2"] is None


def test_the_curveball_contenders_run_or_say_why_not(quick):
    import curveball

    rows = {row["contender"]: row for row in quick[1][0]["rows"]}
    full = rows["curveball-full-batch"]
    if hasattr(curveball, "FULL_BATCH_DEFAULTS"):
        assert full["error"] is None or not full["error"].startswith("skipped")
    else:
        assert full["error"].startswith("skipped") and "FULL_BATCH_DEFAULTS" in full["error"]
    assert rows["curveball"]["curve"]  # it ran, whether or not a step failed


def test_the_adam_grid_picks_its_best_and_adam_lbfgs_continues_it(quick):
    task = quick[1][0]
    grid = task["adam_grid"]
    finals = {lr: math.inf if v is None else v for lr, v in grid["final_rel_l2"].items()}
    assert f"{grid['best_lr']:g}" == min(finals, key=finals.get)
    assert sorted(grid["lrs"]) == [1e-4, 1e-3, 1e-2]
    rows = {row["contender"]: row for row in task["rows"]}
    adam, switched = rows["adam"], rows["adam-lbfgs"]
    assert adam["lr"] == switched["lr"] == grid["best_lr"]
    at = switched["notes"]["switch"]["step"]
    prefix = [p for p in switched["curve"] if p[0] <= at]
    assert prefix == [p for p in adam["curve"] if p[0] <= at]
    assert grid["total_seconds"] >= adam["seconds"]


def test_a_budget_too_small_for_any_threshold_prints_dashes():
    (task,) = pinn_race.run(["--quick", "--tasks", "heat1d", "--budget", "1e-9", "--threads", "1",
                             "--contenders", "engd", "adam", "adam-lbfgs", "--adam-lrs", "1e-3",
                             "--no-warmup"])  # fmt: skip
    for row in task["rows"]:
        assert row["steps"] == 1 and row["error"] is None
        assert set(row["time_to"].values()) == {None}
    text = pinn_race.markdown([task], {"budget": 1e-9, "device": "cpu", "threads": 1})
    assert "—" in text and "inf" not in text and "nan" not in text


def test_fresh_points_are_shared_by_step_and_fixed_points_never_move():
    args = pinn_race.parse_args(["--quick"])
    fresh = pinn_race.Problem.create(TASKS["poisson5d"].shrunk(0.01), args)
    a, b, c = fresh.batch(3), fresh.batch(3), fresh.batch(4)
    assert torch.equal(a["interior"], b["interior"])
    assert not torch.equal(a["interior"], c["interior"])
    fixed = pinn_race.Problem.create(TASKS["poisson2d"].shrunk(0.01), args)
    assert fixed.batch(0) is fixed.batch(7)
    again = pinn_race.Problem.create(TASKS["poisson2d"].shrunk(0.01), args)
    assert torch.equal(fixed.eval_x, again.eval_x)
    for p, q in zip(fixed.init.parameters(), again.init.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_schedule_evaluates_every_early_step_then_sparsely():
    schedule = pinn_race.Schedule(interval=math.inf)
    due = [step for step in range(1, 1000) if schedule.due(step, 0.0)]
    assert due[:10] == list(range(1, 11)) and len(due) < 50
    assert all(b / a <= 1.2 + 1 / a for a, b in zip(due[10:], due[11:], strict=False))
    timed = pinn_race.Schedule(interval=1.0, first=0, growth=1000.0)  # time alone
    assert [timed.due(s, t) for s, t in [(1, 0.1), (2, 0.5), (3, 1.2), (4, 1.3)]] == [
        True, False, True, False
    ]  # fmt: skip


def test_bad_arguments_are_refused_by_name(capsys):
    refused = [(["--budget", "0"], "--budget"), (["--adam-fraction", "1"], "--adam-fraction")]
    for argv, name in refused:
        with pytest.raises(SystemExit):
            pinn_race.parse_args(argv)
        assert name in capsys.readouterr().err


def test_the_gramian_engd_is_skipped_on_the_deep_net_with_the_reason():
    args = pinn_race.parse_args(["--quick"])
    problem = pinn_race.Problem.create(TASKS["poisson5d-deep"].shrunk(0.01), args)
    with pytest.raises(pinn_race.Skipped, match="10,065"):
        pinn_race.make_stepper("engd", problem.init, problem, args)
    run = pinn_race.run_contender("engd", problem, args)
    assert run.error.startswith("skipped") and run.steps == 0


@pytest.mark.parametrize("name", ["curveball-exact", "curveball-pointwise"])
def test_the_exact_contenders_take_the_gauss_newton_step_of_engd(name):
    """``curveball-exact`` (the batched residual, J by forward-mode columns) and
    ``curveball-pointwise`` (the preset on the pointwise residual, products from its J):
    from the initial weights, the step is ENGD's Gauss-Newton direction
    −(JᵀJ + 1e-10·I)⁻¹Jᵀr (J from the benchmark's own per-point reverse mode, a second code
    path), times the line search's step length."""
    args = pinn_race.parse_args(["--quick"])
    problem = pinn_race.Problem.create(TASKS["poisson2d"].shrunk(0.05), args)
    model = problem.init
    points = problem.batch(0)
    functional = pinn_race.FunctionalResidual(problem.task.pde, model, points)
    residual, jacobian = (t.detach() for t in functional.jacobian(functional.parameters()))
    gramian = jacobian.T @ jacobian + 1e-10 * torch.eye(jacobian.shape[1], dtype=torch.float64)
    direction = -torch.linalg.solve(gramian, jacobian.T @ residual)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    step = pinn_race.make_stepper(name, model, problem, args)
    step(points)
    info = step.optimizer.last
    if name == "curveball-pointwise":
        assert info.engine == "jacobian"  # the products came from the residual's J
    assert not info.skipped and info.step_length < 1.0  # the full step rose: it was shortened
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    # the Gramian is singular here (its smallest eigenvalue is 0 to rounding), so the step
    # is compared where it is determined: as the change J·Δw of the residual it predicts
    moved, expected = jacobian @ (after - before), info.step_length * (jacobian @ direction)
    assert (moved - expected).norm() <= 1e-5 * expected.norm()
