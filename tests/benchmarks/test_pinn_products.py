"""The PINN product costs benchmark: complete rows, and the Jacobians it times agree."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch

from benchmarks import pinn_products
from benchmarks.pdes import TASKS, FunctionalResidual
from benchmarks.pinn_race import Problem
from curveball._curvature.engine_choice import EngineChoice
from curveball._curvature.module_tensors import ModuleTensors
from curveball._gauss_newton import jacobian


@pytest.mark.parametrize("engine", pinn_products.ENGINES)
def test_the_dense_jacobian_of_either_engine_equals_the_per_sample_one(engine):
    problem = Problem.create(TASKS["heat1d"].shrunk(0.02), Namespace(device="cpu", seed=0,
                                                                     eval_points=4))  # fmt: skip
    model, points = problem.init, problem.batch(0)
    params = list(model.parameters())
    choice = EngineChoice(params, ModuleTensors(model, params), engine)

    def dense(e):
        y, _ = e.linearize(lambda: problem.residual(model, points), [torch.zeros_like(p)
                                                                      for p in params])  # fmt: skip
        return jacobian(e, params, y)

    try:
        ours = choice.run(dense, lambda: None)
    finally:
        choice.engine.finish()
    functional = FunctionalResidual(problem.task.pde, model, points)
    _, per_sample = functional.jacobian(functional.parameters())
    torch.testing.assert_close(ours, per_sample, rtol=1e-10, atol=1e-12)


def test_the_table_has_every_product(tmp_path, monkeypatch):
    monkeypatch.setattr(pinn_products, "TASKS", {"tiny": TASKS["poisson2d"].shrunk(0.02)})
    out = tmp_path / "products.md"
    result = pinn_products.main(["--task", "tiny", "--repeats", "1", "--markdown", str(out)])
    names = list(result["ms"])
    assert names[0] == "model_fn" and names[-1].startswith("per-sample J")
    assert all(f"{kind} ({engine})" in names for kind in ("first pass", "J v", "Jᵀ u",
               "dense J") for engine in pinn_products.ENGINES)  # fmt: skip
    assert all(ms > 0 for ms in result["ms"].values())
    assert out.read_text().count("\n| ") == len(names) + 2  # the header and its rule
