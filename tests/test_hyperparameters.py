"""The hyper-parameters: their checks, the paper's settings, and what may differ per group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curveball import FULL_BATCH_DEFAULTS, CurveBall
from curveball import _hyperparameters as hp
from curveball._layout import AVERAGE

VALID = {**hp.PAPER_DEFAULTS, "precondition_decay": 0.999, "precondition_eps": 1e-8,
         "precondition_interval": 1, "precondition_rank": 64}  # fmt: skip


def test_the_names_are_the_constructors_hyperparameters():
    opt = CurveBall(nn.Linear(2, 1))
    assert set(hp.NAMES) == set(opt.defaults) == set(opt.param_groups[0]) - {"params"}
    hp.check(VALID)  # the paper's settings are valid


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [("lr", -1.0, "finite value >= 0"), ("lambd", float("inf"), "finite value >= 0"),
     ("weight_decay", "0.1", "finite value >= 0"), ("lambda_min", float("nan"), ">= 0"),
     ("lambda_factor", 0.0, r"\(0, 1\]"), ("lambda_factor", 1.5, r"\(0, 1\]"),
     ("lambda_thresholds", (0.5, 0.5), "low < high"), ("lambda_thresholds", (1,), "low < high"),
     ("lambda_interval", 0, "integer >= 1"), ("step_size_interval", True, "integer >= 1"),
     ("momentum", float("nan"), "None"), ("precondition", 1, "'gauss-newton'"),
     ("reject_uphill", None, "True or False"), ("precondition_decay", 1.0, r"\[0, 1\)"),
     ("precondition", "adam", "'gauss-newton'"), ("precondition_interval", 0, "integer >= 1"),
     ("precondition_rank", "fast", "integer >= 1 or 'auto'"),
     ("precondition_interval", 2.0, "integer >= 1 or 'auto'"), ("inner_steps", "auto", ">= 1,"),
     ("inner_steps", 1.5, "integer >= 1"), ("solver", "cg", "expected one of"),
     ("precondition_eps", 0.0, "> 0"), ("curvature_fraction", 0.0, r"\(0, 1\]"),
     ("curvature_fraction", True, r"\(0, 1\]")],
)  # fmt: skip
def test_each_bad_value_gets_an_error_naming_it(name, value, match):
    with pytest.raises(ValueError, match=rf"{name}: .*{match}"):
        hp.check({**VALID, name: value})


def test_only_lr_and_weight_decay_may_differ_between_groups():
    groups = [dict(VALID, params=[]), dict(VALID, params=[], lr=0.5, weight_decay=0.1)]
    assert hp.shared(groups, hp.NAMES) is groups[0]
    groups[1]["lambd"] = 0.3
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lambd'\]: 0.3 differs"):
        hp.shared(groups, hp.NAMES)


def test_the_module_is_both_params_and_model():
    model = nn.Linear(2, 1)
    params, module = hp.module_and_params(model, None, "auto")
    assert module is model and list(params) == list(model.parameters())
    with pytest.raises(ValueError, match="given twice"):
        hp.module_and_params(model, nn.Linear(2, 1), "auto")
    with pytest.raises(TypeError, match="got a Tensor"):
        hp.module_and_params(torch.zeros(2, requires_grad=True), None, "auto")
    with pytest.raises(ValueError, match="needs the nn.Module"):
        hp.module_and_params(model.parameters(), None, "forward")
    with pytest.raises(ValueError, match="forward_mode: expected one of"):
        hp.module_and_params(model, None, "reverse")


@pytest.mark.parametrize(
    ("param", "match"),
    [(torch.zeros(2, dtype=torch.int64), "floating-point"),
     (torch.zeros(2, 2).to_sparse(), "sparse")],
)  # fmt: skip
def test_parameters_that_cannot_be_optimized_are_refused(param, match):
    with pytest.raises(ValueError, match=match):
        hp.check_parameters([param])


def test_sparse_embeddings_are_refused_by_name():
    model = nn.Sequential(nn.Embedding(4, 2, sparse=True))
    with pytest.raises(ValueError, match=r"module '0' \(Embedding with sparse=True\)"):
        hp.check_sparse_modules(model)


def fit_least_squares_with_the_preset() -> tuple[CurveBall, nn.Module]:
    """Eight preset steps on a linear least-squares problem; the fit must equal ``lstsq``."""
    torch.manual_seed(0)
    model = nn.Linear(6, 2).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    t = torch.randn(40, 2, dtype=torch.float64)
    opt = CurveBall(model, **FULL_BATCH_DEFAULTS)
    for _ in range(8):
        opt.step(lambda: (model(x) - t).reshape(-1), lambda r: 0.5 * (r**2).sum())
    design = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, t).solution
    fitted = torch.cat([model.weight.T, model.bias[None]], dim=0)
    torch.testing.assert_close(fitted, solution, rtol=1e-9, atol=1e-10)
    return opt, model


def test_the_full_batch_preset_solves_linear_least_squares_to_rounding():
    fit_least_squares_with_the_preset()
    assert hp.NAMES and set(FULL_BATCH_DEFAULTS) - {"forward_mode"} <= set(hp.NAMES)


@pytest.mark.parametrize(
    ("size", "kind"),
    [(hp.DENSE_LIMIT, "gauss-newton"), (hp.DENSE_LIMIT + 1, "nystrom"),
     (hp.NYSTROM_LIMIT, "nystrom"), (hp.NYSTROM_LIMIT + 1, "diagonal")],
)  # fmt: skip
def test_auto_chooses_the_preconditioner_by_size(size, kind):
    assert hp.preconditioner("auto", size) == kind
    assert hp.preconditioner(True, size) == "diagonal" and hp.preconditioner(False, size) is None


def test_the_full_batch_preset_sketches_between_the_limits(monkeypatch):
    """With the dense limit below the model's size, ``"auto"`` sketches ``G``: a sketch of
    rank ≥ D is exact, so the preset still fits least squares to rounding."""
    import curveball._products as products

    sketch, calls = products.sketch, []

    def counted(*args, **kwargs):
        calls.append(1)
        return sketch(*args, **kwargs)

    monkeypatch.setattr(products, "sketch", counted)
    monkeypatch.setattr(hp, "DENSE_LIMIT", 8)  # the model has 14 parameters
    opt, model = fit_least_squares_with_the_preset()
    assert calls and all(AVERAGE not in opt.state[p] for p in model.parameters())
