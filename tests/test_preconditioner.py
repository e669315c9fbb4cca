"""The diagonal preconditioner of z's update: its formula, its fixed point (the damped Newton
step of a dense oracle), the plane it minimises over, and its state through faults and
checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import cross_entropy, flat_state, tiny_problem
from torch import nn

from benchmarks.oracles import dense_problem
from curveball import PAPER_DEFAULTS, CurveBall
from curveball._preconditioner import precondition_, square_average_like, workspace_like


def test_direction_and_average_follow_the_formula():
    g = torch.Generator().manual_seed(0)
    dz = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g)]
    v = [torch.rand(3, 4, generator=g, dtype=torch.float64), torch.rand(5, generator=g)]
    before = [t.clone() for t in v]
    expected_v = [0.9 * a + 0.1 * d * d for a, d in zip(v, dz, strict=True)]
    expected_d = [d / (a.sqrt() + 1e-3) for d, a in zip(dz, expected_v, strict=True)]
    new_v, _ = precondition_(dz, v, 0.9, 1e-3)
    torch.testing.assert_close(new_v, expected_v, rtol=1e-6, atol=0)
    torch.testing.assert_close(dz, expected_d, rtol=1e-6, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(v, before, strict=True))  # v itself untouched


def test_a_workspace_gives_the_same_results_in_its_own_buffers():
    g = torch.Generator().manual_seed(1)
    dz = [torch.randn(3, 4, generator=g).t(), torch.randn(5, generator=g)]  # one transposed
    v = [torch.rand(3, 4, generator=g).t(), torch.rand(5, generator=g)]
    workspace = workspace_like(v)
    for _ in range(2):  # the buffers are reused
        d_fresh, d_kept = [t.clone() for t in dz], [t.clone() for t in dz]
        fresh, _ = precondition_(d_fresh, v, 0.9, 1e-3)
        kept, _ = precondition_(d_kept, v, 0.9, 1e-3, workspace)
        assert all(a is b for a, b in zip(kept, workspace[0], strict=True))
        assert [t.stride() for t in kept] == [t.stride() for t in v]
        torch.testing.assert_close(kept, fresh, rtol=0, atol=0)
        torch.testing.assert_close(d_kept, d_fresh, rtol=0, atol=0)
        v = [t.clone() for t in kept]


def test_half_precision_keeps_the_average_in_float32():
    p = torch.zeros(4, dtype=torch.float16)
    v = [square_average_like(p)]
    dz = [torch.tensor([300.0, -300.0, 1e-3, 0.0], dtype=torch.float16)]  # 300² > float16's max
    new_v, _ = precondition_(dz, v, 0.5, 1e-8)
    assert v[0].dtype == new_v[0].dtype == torch.float32 and dz[0].dtype == torch.float16
    assert torch.isfinite(new_v[0]).all() and torch.isfinite(dz[0]).all()
    torch.testing.assert_close(
        dz[0][:2].float(), torch.tensor([2**0.5, -(2**0.5)]), rtol=1e-3, atol=0
    )


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_frozen_parameters_drive_z_to_the_damped_newton_step(kind):
    """P changes the path, not the fixed point: z → −(G + λI)⁻¹ g."""
    model, x, loss_fn = tiny_problem(kind=kind)
    lambd = 0.05
    opt = CurveBall(model, lr=0.0, lambd=lambd, auto_lambda=False, precondition=True)
    for _ in range(300):
        opt.step(lambda: model(x), loss_fn)
    dense = dense_problem(model, x, loss_fn)
    n = dense["w"].numel()
    newton = -torch.linalg.solve(dense["G"] + lambd * torch.eye(n, dtype=torch.float64), dense["g"])
    z = flat_state(opt, model, "z")
    assert (z - newton).norm() / newton.norm() <= 1e-6


def test_the_step_minimises_the_model_over_z_and_the_preconditioned_direction():
    model, x, loss_fn = tiny_problem(1)
    opt = CurveBall(model, lr=0.0, lambd=0.2, auto_lambda=False, precondition=True)
    for _ in range(3):
        opt.step(lambda: model(x), loss_fn)
    dense = dense_problem(model, x, loss_fn)
    z, v = flat_state(opt, model, "z"), flat_state(opt, model, "dz_square_average")
    system = dense["G"] + 0.2 * torch.eye(z.numel(), dtype=torch.float64)
    dz = system @ z + dense["g"]
    new_v = 0.999 * v + 0.001 * dz * dz
    d = dz / (new_v.sqrt() + 1e-8)
    opt.step(lambda: model(x), loss_fn)
    basis = torch.stack([z, d], dim=1)
    c_star = torch.linalg.lstsq(basis.T @ system @ basis, -basis.T @ dense["g"]).solution
    got = torch.tensor([opt.last.rho, -opt.last.beta], dtype=torch.float64)
    torch.testing.assert_close(got, c_star, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(
        flat_state(opt, model, "dz_square_average"), new_v, rtol=1e-9, atol=0
    )
    torch.testing.assert_close(flat_state(opt, model, "z"), basis @ c_star, rtol=1e-6, atol=1e-12)


def test_a_skipped_step_leaves_the_average_unchanged():
    model, x, loss_fn = tiny_problem(2)
    opt = CurveBall(model, precondition=True)
    opt.step(lambda: model(x), loss_fn)
    v = flat_state(opt, model, "dz_square_average").clone()
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(lambda: model(x) * float("nan"), loss_fn)
    assert opt.last.skipped and torch.equal(flat_state(opt, model, "dz_square_average"), v)


def test_the_average_follows_its_recurrence_across_steps_skips_and_trials():
    """The kept buffers trade places at every committed step: the state must always hold
    the latest committed v (computed here from the dense oracle's Δz), never a buffer."""
    model, x, loss_fn = tiny_problem(5)
    lambd, decay = 0.3, 0.5
    opt = CurveBall(
        model, lr=0.0, lambd=lambd, auto_lambda=True, lambda_interval=2,
        lambda_factor=1.0, precondition=True, precondition_decay=decay,
    )  # fmt: skip
    dense = dense_problem(model, x, loss_fn)
    system = dense["G"] + lambd * torch.eye(dense["w"].numel(), dtype=torch.float64)
    v = torch.zeros_like(dense["w"])
    for step in range(6):
        z = flat_state(opt, model, "z") if step else torch.zeros_like(v)
        if step == 3:
            with pytest.warns(RuntimeWarning, match="skipped"):
                opt.step(lambda: model(x) * float("nan"), loss_fn)
        else:
            opt.step(lambda: model(x), loss_fn)
            dz = system @ z + dense["g"]
            v = decay * v + (1 - decay) * dz * dz
        assert opt.last.skipped == (step == 3)
        torch.testing.assert_close(
            flat_state(opt, model, "dz_square_average"), v, rtol=1e-9, atol=0
        )


def test_checkpoints_carry_the_average_and_resume_identically():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    twin = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, loss_fn = torch.randn(10, 5, dtype=torch.float64), cross_entropy(torch.arange(10) % 3)
    a = CurveBall(model, precondition=True, precondition_decay=0.9)
    for _ in range(3):
        a.step(lambda: model(x), loss_fn)
    twin.load_state_dict(model.state_dict())
    b = CurveBall(twin, precondition=True, precondition_decay=0.9)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as if through a file
    for _ in range(3):
        a.step(lambda: model(x), loss_fn)
        b.step(lambda: twin(x), loss_fn)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_loading_keeps_the_float32_average_of_half_parameters():
    """torch.optim casts saved state to the parameter's dtype; v above float16's range
    (65504) must come back as saved, not as inf."""
    model = nn.Linear(3, 2).half()
    a = CurveBall(model)
    for p in model.parameters():
        a.state[p]["z"] = torch.zeros_like(p)
        a.state[p]["dz_square_average"] = torch.full(p.shape, 1e5, dtype=torch.float32)
    b = CurveBall(model)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for p in model.parameters():
        v = b.state[p]["dz_square_average"]
        assert v.dtype == torch.float32 and torch.equal(v, torch.full(p.shape, 1e5))
        assert b.state[p]["z"].dtype == torch.float16


def test_the_paper_defaults_turn_it_off():
    assert PAPER_DEFAULTS["precondition"] is False
    model, x, loss_fn = tiny_problem(4)
    opt = CurveBall(model, **PAPER_DEFAULTS)
    opt.step(lambda: model(x), loss_fn)
    assert all("dz_square_average" not in opt.state[p] for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"precondition": 1}, "precondition"),
        ({"precondition_decay": 1.0}, "precondition_decay"),
        ({"precondition_eps": 0.0}, "precondition_eps"),
    ],
)
def test_bad_preconditioner_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CurveBall(nn.Linear(2, 2), **kwargs)
