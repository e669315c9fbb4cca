"""Smoke test of ``benchmarks.step_time`` on a tiny model (no timing assertions)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import step_time

METHODS = {
    "sgd",
    "adam",
    "curveball",
    "curveball-paper",
    "curveball-double-backward",
    "older-double-backward",
    "ideal",
    "ideal-lean",
}
ROW_KEYS = {
    "model",
    "method",
    "median_s",
    "peak_mem_bytes",
    "batch_size",
    "ratio_sgd",
    "ratio_ideal",
    "ratio_ideal_lean",
}


def test_step_time_tiny_json(tmp_path):
    out = tmp_path / "r.json"
    args = ["--models", "tiny", "--repeats", "2", "--warmup", "1", "--batch-size", "8"]
    result = step_time.run([*args, "--device", "cpu", "--json", str(out)])

    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert set(data) >= {"device", "batch_size", "torch", "threads", "rows"}
    assert data["device"] == "cpu"
    assert data["batch_size"] == 8
    assert isinstance(data["torch"], str)
    assert isinstance(data["threads"], int) and data["threads"] >= 1

    rows = data["rows"]
    assert {r["method"] for r in rows} == METHODS
    assert len(rows) == len(METHODS)
    for r in rows:
        assert set(r) >= ROW_KEYS
        assert r["model"] == "tiny"
        assert r["batch_size"] == 8
        assert isinstance(r["median_s"], float)
        assert math.isfinite(r["median_s"]) and r["median_s"] > 0
        assert r["peak_mem_bytes"] is None
        for key in ("ratio_sgd", "ratio_ideal", "ratio_ideal_lean"):
            assert isinstance(r[key], float)
            assert math.isfinite(r[key]) and r[key] > 0

    by_method = {r["method"]: r for r in rows}
    assert by_method["sgd"]["ratio_sgd"] == 1.0
    assert by_method["ideal"]["ratio_ideal"] == 1.0
    assert by_method["ideal-lean"]["ratio_ideal_lean"] == 1.0

    cb = by_method["curveball"]["median_s"]
    expected = (
        f"| tiny | {cb / by_method['ideal']['median_s']:.2f} | "
        f"{cb / by_method['sgd']['median_s']:.2f} | "
        f"{by_method['curveball-double-backward']['median_s'] / cb:.2f} | "
        f"{by_method['older-double-backward']['median_s'] / cb:.2f} | - |"
    )
    assert expected in step_time.format_targets(result).splitlines()


@pytest.mark.parametrize("lean", [False, True])
def test_ideal_step_matches_plain_autograd(lean):
    import torch

    work = step_time.make_workload("tiny", 8, torch.device("cpu"), seed=0)
    grads = step_time._ideal_step(work.model, work.x, work.t, seed=0, lean=lean)()

    params = list(work.model.parameters())
    gen = torch.Generator().manual_seed(2)
    for p in params:  # same draws as the benchmark: tangents first, then the output vector
        torch.randn(p.shape, generator=gen)
    grad_out = torch.randn(8, step_time.TINY_CLASSES, generator=gen)
    expected = torch.autograd.grad(work.model(work.x), params, grad_outputs=grad_out)
    assert len(grads) == len(expected)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_older_double_backward_step_is_a_curveball_step():
    """The reference contender takes the library's steps (λ fixed at 1, no trust-region test)."""
    import copy

    import torch
    import torch.nn.functional as F

    from curveball import CurveBall

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)
    ).double()
    twin = copy.deepcopy(model)
    x = torch.randn(9, 5, dtype=torch.float64)
    t = torch.randint(0, 3, (9,))
    older = step_time._older_step(model, x, t)
    opt = CurveBall(twin, lambd=1.0, auto_lambda=False, precondition=False)
    for _ in range(4):
        older()
        opt.step(lambda: twin(x), lambda y: F.cross_entropy(y, t))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)


def test_the_authors_implementation_is_loaded_from_a_local_path(tmp_path):
    """A stand-in with the authors' interface (their code is never part of the repository)."""
    (tmp_path / "curveball.py").write_text(
        "import torch\n"
        "class CurveBall(torch.optim.SGD):\n"
        "    def __init__(self, params, lr, momentum, lambd):\n"
        "        super().__init__(params, lr=0.01)\n"
        "    def step(self, model_fn, loss_fn):\n"
        "        self.zero_grad(); loss = loss_fn(model_fn()); loss.backward()\n"
        "        super().step(); return loss, None\n"
    )
    args = [
        "--models",
        "tiny",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--batch-size",
        "8",
        "--methods",
        "sgd",
        "curveball",
        "--authors",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    result = step_time.run(args)  # fmt: skip
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["sgd", "curveball", "authors"]
    rows = {r["method"]: r["median_s"] for r in result["rows"]}
    expected = f"{rows['curveball'] / rows['authors']:.2f} |"
    assert step_time.format_targets(result).splitlines()[-1].endswith(expected)
    with pytest.raises(SystemExit, match="no curveball.py"):
        step_time.run([*args[:-4], "--authors", str(tmp_path / "missing")])
