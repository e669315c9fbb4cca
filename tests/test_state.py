"""Optimizer state: hyper-parameters in param_groups, the global record, checkpoints old and new."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from cases import CASES, cross_entropy
from torch import nn

from curveball import CurveBall
from curveball._state import CurveBallState
from curveball.losses import cross_entropy as closed_form_cross_entropy

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_0_1_0.pt"
FIXTURE_0_2_0 = Path(__file__).parent / "fixtures" / "checkpoint_0_2_0.pt"


def fixture_model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def test_a_checkpoint_of_release_0_1_0_resumes_exactly():
    """Written by the 0.1.0 release: model, optimizer, the next batches and the result."""
    saved = torch.load(FIXTURE, weights_only=False)
    model = fixture_model()
    model.load_state_dict(saved["model"])
    groups = [
        {"params": model[0].parameters(), "weight_decay": 1e-2},
        {"params": model[2].parameters(), "lr": 0.5},
    ]
    opt = CurveBall(
        groups,
        model=model,
        lambd=0.3,
        lambda_interval=2,
        lambda_thresholds=(0.95, 1.05),
        lambda_factor=0.9,
    )
    opt.load_state_dict(saved["optimizer"])
    assert opt.steps == 3 and opt.curveball_state.sizes is not None
    assert opt.param_groups[0]["precondition"] is False  # it did not exist then
    for x, t in saved["batches"]:
        opt.step(lambda x=x: model(x), cross_entropy(t))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved["expected_model"][name], rtol=1e-13, atol=1e-15)
    assert opt.lambd == pytest.approx(saved["expected_lambd"], rel=1e-13)


def test_a_checkpoint_of_release_0_2_0_resumes_exactly():
    """Written by the 0.2.0 release (two groups, weight decay, the preconditioner's average):
    the model, the optimizer after four steps, the next batches and the result after them."""
    saved = torch.load(FIXTURE_0_2_0, weights_only=False)
    model = fixture_model()
    model.load_state_dict(saved["model"])
    groups = [
        {"params": model[0].parameters(), "weight_decay": 1e-2},
        {"params": model[2].parameters(), "lr": 0.5},
    ]
    opt = CurveBall(groups, model=model, lambd=0.3, lambda_interval=2)
    opt.load_state_dict(saved["optimizer"])
    assert opt.steps == 4 and all("dz_square_average" in s for s in opt.state.values())
    for x, t in saved["batches"]:
        opt.step(lambda x=x: model(x), closed_form_cross_entropy(t))
    # To rounding: the last bits of a matrix product depend on the CPU's kernels.
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved["expected_model"][name], rtol=1e-13, atol=1e-15)
    assert opt.lambd == pytest.approx(saved["expected_lambd"], rel=1e-13)


def test_every_hyper_parameter_is_in_the_param_groups_and_the_state_dict():
    model, _, _ = CASES["mlp"].make()
    opt = CurveBall(model, momentum=0.5, lambda_interval=3, step_size_interval=2)
    group = opt.param_groups[0]
    for name, value in {
        "lr": 1.0,
        "momentum": 0.5,
        "beta": None,
        "lambd": 0.1,
        "auto_lambda": True,
        "lambda_factor": (2.0 / 3.0) ** 0.2,
        "lambda_thresholds": (0.25, 0.75),
        "lambda_min": 0.05,
        "lambda_interval": 3,
        "step_size_interval": 2,
        "weight_decay": 0.0,
        "precondition": True,
        "precondition_decay": 0.999,
        "precondition_eps": 1e-8,
    }.items():
        assert group[name] == value
    saved = opt.state_dict()
    assert saved["param_groups"][0]["lambda_interval"] == 3
    assert saved["curveball"] == {
        "lambd": 0.1,
        "step": 0,
        "rho": None,
        "beta": None,
        "psd_loss": False,
        "loss_scale": 2.0**16,
        "scaled_steps": 0,
    }


def test_global_hyper_parameters_must_agree_across_groups():
    model, x, t = CASES["mlp"].make()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['momentum'\]"):
        CurveBall(
            [{"params": model[0].parameters()}, {"params": model[2].parameters(), "momentum": 0.1}]
        )
    opt = CurveBall(
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}], model=model
    )
    opt.param_groups[1]["lambda_interval"] = 7  # e.g. a scheduler touching one group only
    with pytest.raises(ValueError, match="lambda_interval"):
        opt.step(lambda: model(x), cross_entropy(t))


def test_a_global_hyper_parameter_changed_in_the_groups_takes_effect():
    model, x, t = CASES["mlp"].make()
    opt = CurveBall(model, lambda_interval=100)
    opt.param_groups[0]["lambda_interval"] = 1
    opt.step(lambda: model(x), cross_entropy(t))
    assert opt.last.trust_ratio is not None


def test_a_checkpoint_of_another_model_is_refused_before_anything_is_overwritten():
    model, x, t = CASES["mlp"].make()
    other = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    donor = CurveBall(other, lambd=7.0)
    donor.step(lambda: other(x), cross_entropy(t))
    opt = CurveBall(model)
    opt.step(lambda: model(x), cross_entropy(t))
    before = (opt.lambd, opt.steps, [opt.state[p]["z"].clone() for p in model.parameters()])
    with pytest.raises(ValueError, match="another model"):
        opt.load_state_dict(donor.state_dict())
    assert (opt.lambd, opt.steps) == before[:2]
    assert all(
        torch.equal(opt.state[p]["z"], z)
        for p, z in zip(model.parameters(), before[2], strict=True)
    )


@pytest.mark.parametrize(
    "record, match",
    [
        ("not a dict", "expected a dict"),
        ({"lambd": 1.0}, "malformed"),
        ({"lambd": -1.0, "step": 0}, "out of range"),
        ({"lambd": 1.0, "step": -2}, "out of range"),
    ],
)
def test_a_malformed_global_record_is_refused(record, match):
    with pytest.raises(ValueError, match=match):
        CurveBallState.from_dict(record)


def test_the_global_record_round_trips():
    state = CurveBallState(lambd=0.25, step=9, rho=0.9, beta=1.1)
    buffer = io.BytesIO()
    torch.save(state.to_dict(), buffer)
    buffer.seek(0)
    assert CurveBallState.from_dict(torch.load(buffer)) == state


def test_paper_defaults_are_the_published_method_and_differ_from_todays_in_four_places():
    from curveball import PAPER_DEFAULTS

    model, _, _ = CASES["mlp"].make()
    paper = CurveBall(model, **PAPER_DEFAULTS).param_groups[0]
    default = CurveBall(model).param_groups[0]
    differ = {k for k in PAPER_DEFAULTS if paper[k] != default[k]}
    damping = {"lambda_factor", "lambda_thresholds", "lambda_min"}  # the damping rule
    assert differ == {"lambd", "precondition", "reject_uphill"} | damping
    assert PAPER_DEFAULTS["lambd"] == 1.0 and PAPER_DEFAULTS["lambda_interval"] == 5
    assert PAPER_DEFAULTS["lambda_factor"] == 0.999 and PAPER_DEFAULTS["lambda_min"] == 0.0
    assert PAPER_DEFAULTS["lambda_thresholds"] == (0.5, 1.5)
    assert default["lambda_factor"] ** 5 == pytest.approx(2 / 3)  # Martens (2010): ×2/3, ×3/2
    assert default["lambda_thresholds"] == (0.25, 0.75) and default["lambda_min"] == 0.05
    assert PAPER_DEFAULTS["precondition"] is False and default["lambd"] == 0.1
    assert PAPER_DEFAULTS["reject_uphill"] is False and default["reject_uphill"] is True
