"""``curvature_fraction``: the second forward-mode pass on the leading rows of the batch."""

from __future__ import annotations

import math

import pytest
import torch
from cases import CASES, cross_entropy, flat_state
from torch import nn

from benchmarks.oracles import dense_problem, flat_params
from curveball import PAPER_DEFAULTS, CurveBall


def _run(kind: str, fraction: float, steps: int, x, t, **options) -> tuple[torch.Tensor, CurveBall]:
    model = CASES[kind].make(0, batch=1)[0]
    opt = CurveBall(model, curvature_fraction=fraction, **options)
    loss_fn = cross_entropy(t)
    for _ in range(steps):
        opt.step(lambda: model(x), loss_fn)
    return flat_params(model), opt


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("options", [{}, {"precondition": False}, {"weight_decay": 0.05}])
def test_a_batch_of_two_equal_halves_gives_the_whole_batch_trajectory(kind, options):
    # on a batch made of one half twice, the first half's curvature is the whole batch's,
    # so the estimate is exact and the run must equal the one on the whole batch
    _, x, t = CASES[kind].make(1, batch=6)
    x, t = torch.cat([x, x]), torch.cat([t, t])
    whole, _ = _run(kind, 1.0, 8, x, t, **options)
    halves, opt = _run(kind, 0.5, 8, x, t, **options)
    assert not opt.last.skipped
    torch.testing.assert_close(halves, whole, rtol=1e-10, atol=1e-12)


def test_on_distinct_halves_the_run_differs():
    # the same comparison is not vacuous: on an ordinary batch the estimate differs
    _, x, t = CASES["mlp"].make(1, batch=12)
    whole, _ = _run("mlp", 1.0, 8, x, t)
    half, _ = _run("mlp", 0.5, 8, x, t)
    assert (whole - half).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_step_sizes_solve_the_system_with_the_leading_rows_curvature(kind):
    """ρ, β from a dense oracle: the curvature of the first ⌈f n⌉ samples (as a mean
    over them), the exact gradient g of the batch, and b1 = Δzᵀd − zᵀ(G_S + λI)d."""
    model, x, t = CASES[kind].make(2, batch=10)
    lambd, fraction = 0.3, 0.3
    opt = CurveBall(
        model, lr=0.0, lambd=lambd, auto_lambda=False, precondition=False,
        curvature_fraction=fraction,
    )  # fmt: skip
    loss_fn = cross_entropy(t)
    for _ in range(3):  # a nonzero z
        opt.step(lambda: model(x), loss_fn)
    z = flat_state(opt, model)
    whole = dense_problem(model, x, loss_fn)
    r = math.ceil(fraction * len(x))
    part = dense_problem(model, x[:r], cross_entropy(t[:r]))
    eye = torch.eye(z.numel(), dtype=torch.float64)
    d = (whole["G"] + lambd * eye) @ z + whole["g"]  # Δz, exact
    a = part["G"] + lambd * eye
    a11, a12, a22 = d @ a @ d, z @ a @ d, z @ a @ z
    b1, b2 = d @ d - a12, whole["g"] @ z
    system = torch.stack([torch.stack([a11, a12]), torch.stack([a12, a22])])
    beta, minus_rho = torch.linalg.solve(system, torch.stack([b1, b2]))
    opt.step(lambda: model(x), loss_fn)
    torch.testing.assert_close(
        torch.tensor([opt.last.rho, opt.last.beta], dtype=torch.float64),
        torch.stack([-minus_rho, beta]),
        rtol=1e-8,
        atol=1e-12,
    )


def test_the_second_pass_sees_the_leading_rows_and_the_running_statistics_stay():
    model, x, t = CASES["cnn_bn"].make(3, batch=8)
    twin = CASES["cnn_bn"].make(3, batch=8)[0]
    seen: list[int] = []
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    first.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
    loss_fn = cross_entropy(t)
    cut = CurveBall(model, curvature_fraction=0.25)
    CurveBall(twin).step(lambda: twin(x), loss_fn)
    cut.step(lambda: model(x), loss_fn)
    # the cut pass runs on throw-away buffers: the running statistics are the first
    # pass's, on the whole batch, as without the cut
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_twin = [m for m in twin.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn
    for m, m_twin in zip(bn, bn_twin, strict=True):
        torch.testing.assert_close(m.running_mean, m_twin.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(m.running_var, m_twin.running_var, rtol=0, atol=0)
    for _ in range(4):  # the 5th step has a trust-region test: a third pass, whole batch
        cut.step(lambda: model(x), loss_fn)
    assert seen == [8, 2] * 5 + [8]
    assert int(bn[0].num_batches_tracked) == 5


class _Transposed(nn.Module):
    """Predictions with the batch in the second dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.net = CASES["mlp"].make(4, batch=1)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).T


class _Broadcast(nn.Module):
    """All of its predictions' rows come from a parameter, whatever the batch: they are
    not rows of the batch, though the batch is cut."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = nn.Parameter(torch.randn(8, 3, dtype=torch.float64))
        self.scale = nn.Linear(5, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows * self.scale(x).mean()


def _mlp() -> nn.Module:
    return CASES["mlp"].make(5, batch=1)[0]


def _called(m: nn.Module, x: torch.Tensor):
    return lambda: m(x)


def _bypassed(m: nn.Module, x: torch.Tensor):
    return lambda: m.forward(x)


def _transposed_loss(t: torch.Tensor):
    return lambda y: cross_entropy(t)(y.T)


@pytest.mark.parametrize(
    ("make", "model_fn_of", "loss_of", "message"),
    [
        (_Transposed, _called, _transposed_loss, "not their first dimension"),
        (_Broadcast, _called, cross_entropy, "not their first dimension"),
        (_mlp, _bypassed, cross_entropy, "did not call the module"),
    ],
    ids=["batch-second", "rows-not-of-the-batch", "module-bypassed"],
)
def test_a_batch_that_cannot_be_cut_warns_and_the_whole_batch_is_used(
    make, model_fn_of, loss_of, message
):
    _, x, t = CASES["mlp"].make(4, batch=8)

    def run(fraction: float) -> torch.Tensor:
        torch.manual_seed(0)
        model = make()
        opt = CurveBall(model, curvature_fraction=fraction)
        for _ in range(3):
            opt.step(model_fn_of(model, x), loss_of(t))
        return flat_params(model)

    whole = run(1.0)
    with pytest.warns(RuntimeWarning, match=message):
        cut = run(0.5)
    torch.testing.assert_close(cut, whole, rtol=1e-12, atol=1e-14)


def test_double_backward_warns_that_the_whole_batch_is_used():
    model, x, t = CASES["mlp"].make(6, batch=8)
    opt = CurveBall(model, curvature_fraction=0.5, forward_mode="double-backward")
    with pytest.warns(RuntimeWarning, match="forward-mode AD only"):
        opt.step(lambda: model(x), cross_entropy(t))


def test_a_batch_too_small_to_cut_is_exact_and_silent(recwarn):
    _, x, t = CASES["mlp"].make(7, batch=1)
    whole, _ = _run("mlp", 1.0, 4, x, t)
    cut, _ = _run("mlp", 0.5, 4, x, t)  # ⌈0.5 · 1⌉ = 1: nothing to cut
    assert not [w for w in recwarn if "curvature_fraction" in str(w.message)]
    torch.testing.assert_close(cut, whole, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.5, math.nan, True, "0.5"])
def test_bad_fractions_are_refused_by_name(value):
    model = CASES["mlp"].make(0, batch=1)[0]
    with pytest.raises(ValueError, match="curvature_fraction"):
        CurveBall(model, curvature_fraction=value)


def test_the_paper_uses_the_whole_batch():
    assert PAPER_DEFAULTS["curvature_fraction"] == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_step_on_a_curvature_minibatch(dtype):
    model, x, t = CASES["mlp"].make(9, batch=16)
    model, x = model.to(dtype), x.to(dtype)
    before = flat_params(model).clone()
    opt = CurveBall(model, curvature_fraction=0.25)
    for _ in range(3):
        loss, _ = opt.step(lambda: model(x), cross_entropy(t))
        assert torch.isfinite(loss) and not opt.last.skipped, opt.last
    after = flat_params(model)
    assert after.dtype == dtype and torch.isfinite(after).all() and not torch.equal(after, before)


def test_with_dropout_the_random_stream_after_a_step_is_the_whole_batch_runs():
    # the cut pass draws masks for fewer samples, but the generators are left where the
    # first pass left them: the caller's random stream does not depend on the cut
    _, x, t = CASES["mlp"].make(10, batch=8)
    draws = []
    for fraction in (1.0, 0.25):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 3))
        opt = CurveBall(model.double(), curvature_fraction=fraction)
        opt.step(lambda model=model: model(x), cross_entropy(t))
        draws.append(torch.rand(4))
    torch.testing.assert_close(draws[1], draws[0], rtol=0, atol=0)
