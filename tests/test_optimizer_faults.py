"""Faults (non-finite values) and bad input: the model and the optimizer state stay intact."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from cases import CASES
from torch import nn

from curveball import CurveBall, DoubleBackwardUnsupported


def snapshot(model: nn.Module, opt: CurveBall):
    params = [p.detach().clone() for p in model.parameters()]
    zs = [opt.state[p]["z"].clone() for p in model.parameters() if "z" in opt.state[p]]
    buffers = [b.clone() for b in model.buffers()]
    return params, zs, buffers


def assert_unchanged(before, model, opt):
    params, zs, buffers = before
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    now = [opt.state[p]["z"] for p in model.parameters() if "z" in opt.state[p]]
    assert all(torch.equal(a, b) for a, b in zip(zs, now, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


def setup(seed=0):
    model, x, t = CASES["bn_mlp"].make(seed, batch=12, dtype=torch.float32)
    opt = CurveBall(model)
    for _ in range(3):  # a nonzero z and moved statistics
        opt.step(lambda: model(x), lambda y: F.cross_entropy(y, t))
    return model, opt, x, t


class TailInf(nn.Module):
    """Appends a column of +inf to the predictions."""

    def forward(self, y):
        return torch.cat([y, torch.full_like(y[:, :1], math.inf)], dim=1)


FAULTS = {
    # name: (model_fn factory, loss_fn factory, expected word in the warning)
    "loss": (
        lambda m, x: lambda: m(x),
        lambda t: lambda y: F.cross_entropy(y, t) * math.nan,
        "loss",
    ),
    "input": (
        lambda m, x: lambda: m(x * math.inf),
        lambda t: lambda y: F.cross_entropy(y, t),
        "loss",
    ),
    "predictions": (
        lambda m, x: lambda: TailInf()(m(x)),
        lambda t: lambda y: F.cross_entropy(y[:, :3], t),
        "predictions",
    ),
    # |y|^0.5 has an infinite derivative at y = 0: finite loss, non-finite Δz
    "dz": (lambda m, x: lambda: m(x) * 0.0, lambda t: lambda y: y.abs().sqrt().mean(), "Δz"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_non_finite_step_is_skipped_and_training_goes_on(fault):
    model, opt, x, t = setup()
    make_model_fn, make_loss_fn, word = FAULTS[fault]
    before = snapshot(model, opt)
    lambd = opt.lambd
    with pytest.warns(RuntimeWarning, match=f"non-finite {word}"):
        opt.step(make_model_fn(model, x), make_loss_fn(t))
    assert_unchanged(before, model, opt)
    assert opt.last.skipped and opt.lambd > lambd
    loss, _ = opt.step(lambda: model(x), lambda y: F.cross_entropy(y, t))
    assert math.isfinite(loss.item()) and not opt.last.skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_trial_loss_skips_the_step():
    model, opt, x, t = setup()
    opt.param_groups[0]["lambda_interval"] = 1  # test at every step
    calls = []

    def loss_fn(y):
        calls.append(1)
        value = F.cross_entropy(y, t)
        return value * math.nan if len(calls) == 2 else value  # the second call is the trial

    before = snapshot(model, opt)
    lambd = opt.lambd
    with pytest.warns(RuntimeWarning, match="non-finite trial loss"):
        opt.step(lambda: model(x), loss_fn)
    assert len(calls) == 2
    assert_unchanged(before, model, opt)
    assert opt.last.skipped and opt.lambd > lambd


def uphill_loss(t, calls):
    """Cross-entropy that reads 1 higher on its second call (a step's trust-region trial)."""

    def loss_fn(y):
        calls.append(1)
        return F.cross_entropy(y, t) + (1.0 if len(calls) == 2 else 0.0)

    return loss_fn


def test_a_step_that_raises_its_batch_loss_is_rejected_and_z_restarts():
    model, opt, x, t = setup()
    opt.param_groups[0]["lambda_interval"] = 1  # test at every step
    params, zs, buffers = snapshot(model, opt)
    assert any(z.abs().sum() > 0 for z in zs)
    calls = []
    with pytest.warns(RuntimeWarning, match="rejected: the loss on its batch rose"):
        opt.step(lambda: model(x), uphill_loss(t, calls))
    assert len(calls) == 2 and opt.last.trust_ratio < 0
    assert opt.last.skipped and opt.last.reason.startswith("rejected")
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert all(torch.count_nonzero(opt.state[p]["z"]) == 0 for p in model.parameters())
    opt.step(lambda: model(x), lambda y: F.cross_entropy(y, t))
    assert opt.last.refreshed and opt.last.rho == 0.0  # z = 0: a fresh start, ρ irrelevant


def test_the_paper_settings_keep_a_step_that_raises_its_batch_loss():
    model, opt, x, t = setup()
    opt.param_groups[0].update(lambda_interval=1, reject_uphill=False)
    params, _, _ = snapshot(model, opt)
    opt.step(lambda: model(x), uphill_loss(t, []))
    assert opt.last.trust_ratio < 0 and not opt.last.skipped
    assert not all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr"),
        ({"lambd": -0.1}, "lambd"),
        ({"lambda_thresholds": (1.5, 0.5)}, "lambda_thresholds"),
        ({"lambda_interval": 0}, "lambda_interval"),
        ({"lambda_factor": 0.0}, "lambda_factor"),
        ({"lambda_factor": 1.5}, "lambda_factor"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"momentum": math.nan}, "momentum"),
        ({"forward_mode": "reverse"}, "forward_mode"),
        ({"step_size_interval": 0}, "step_size_interval"),
        ({"reject_uphill": "yes"}, "reject_uphill"),
    ],
)
def test_bad_hyper_parameters_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CurveBall(nn.Linear(2, 2), **kwargs)


def test_bad_parameters_are_refused():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        CurveBall(frozen)
    with pytest.raises(ValueError, match="floating-point parameters"):
        CurveBall(
            [nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)], lambd=0.1
        ).add_param_group({"params": [torch.zeros(2, dtype=torch.int32)]})
    with pytest.raises(ValueError, match="sparse"):
        CurveBall([nn.Parameter(torch.eye(2).to_sparse())])
    with pytest.raises(ValueError, match="forward_mode"):
        CurveBall(nn.Linear(2, 2).parameters(), forward_mode="forward")


def test_bad_callables_raise_clear_type_errors():
    model = nn.Linear(3, 2)
    opt = CurveBall(model)
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="model_fn must return a torch.Tensor"):
        opt.step(lambda: (model(x),), lambda y: y.sum())
    with pytest.raises(TypeError, match="loss_fn must return a floating-point scalar"):
        opt.step(lambda: model(x), lambda y: y.pow(2))
    with pytest.raises(TypeError, match="loss_fn must return a scalar"):
        opt.step(lambda: model(x), lambda y: 3.0)
    with pytest.raises(TypeError, match="model_fn: expected a callable"):
        opt.step(model(x), lambda y: y.sum())
    # nothing was changed by the refused calls
    assert opt.steps == 0 and all(
        torch.count_nonzero(opt.state[p]["z"]) == 0 for p in model.parameters()
    )
    opt.step(lambda: model(x), lambda y: y.pow(2).mean())
    assert opt.steps == 1


def test_an_error_mid_step_leaves_module_buffers_and_randomness_untouched():
    model, opt, x, t = setup()
    before = snapshot(model, opt)
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    with pytest.raises(TypeError, match="loss_fn"):
        opt.step(lambda: model(x), lambda y: y.pow(2))  # not a scalar: found after the first pass
    assert torch.equal(torch.rand(2), expected)
    assert_unchanged(before, model, opt)


def test_compiled_module_gets_a_clear_error_and_leaves_everything_intact():
    """A torch.compile'd module has no forward-mode rule and no double backward."""
    model, opt, x, t = setup()
    compiled = torch.compile(model, backend="aot_eager")
    before = snapshot(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no misleading "falling back" warning before the error
        with pytest.raises(DoubleBackwardUnsupported, match="torch.compile'd modules"):
            opt.step(lambda: compiled(x), lambda y: F.cross_entropy(y, t))
    assert_unchanged(before, model, opt)
    assert opt.steps == 3
    # the uncompiled module still trains with true forward mode
    opt.step(lambda: model(x), lambda y: F.cross_entropy(y, t))
    assert opt.last.engine == "forward"
    assert opt.steps == 4
