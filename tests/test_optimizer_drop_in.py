"""CurveBall as a drop-in: every defect that once broke it or made it silently do nothing."""

from __future__ import annotations

import copy
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import CASES, cross_entropy
from torch import nn

from benchmarks.oracles import flat_params
from curveball import CurveBall


def train(model, opt, x, loss_fn, steps):
    return [opt.step(lambda: model(x), loss_fn)[0].item() for _ in range(steps)]


def cauchy_far_from_target(y: torch.Tensor) -> torch.Tensor:
    """log(1 + r²) at residuals near -10: concave there, so H_L is negative definite."""
    return torch.log1p((y - 10.0) ** 2).sum(dim=1).mean()


def one_minus_p_correct(t):
    return lambda y: (1.0 - torch.softmax(y, dim=1).gather(1, t[:, None])).mean()


@pytest.mark.parametrize("lambd, precondition", [(0.1, True), (1.0, True), (1e-3, False)])
@pytest.mark.parametrize("kind", ["cauchy", "1-p"])
def test_a_loss_that_is_not_convex_in_the_predictions_trains_and_says_so_once(
    kind, lambd, precondition
):
    model, x, t = CASES["mlp"].make(batch=32, dtype=torch.float32)
    loss_fn = cauchy_far_from_target if kind == "cauchy" else one_minus_p_correct(t)
    opt = CurveBall(model, lambd=lambd, lambda_interval=1, precondition=precondition)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        losses = train(model, opt, x, loss_fn, 20)
    convexity = [w for w in caught if "not convex" in str(w.message)]
    if kind == "cauchy" or opt.curveball_state.psd_loss:
        assert len(convexity) == 1 and convexity[0].filename == __file__
    assert opt.curveball_state.psd_loss or kind == "1-p"
    if lambd >= 0.1:
        assert losses[-1] < 0.8 * losses[0]
    else:  # little damping: what matters is that it moves and λ adapts
        assert min(losses) < losses[0]
    assert opt.lambd != lambd  # the trust-region test ran and moved λ
    assert not all(s == 0.0 for s in (opt.last.rho, opt.last.beta))


@pytest.mark.parametrize(
    "make_fn",
    [
        lambda m, x: lambda: m(x).detach(),
        lambda m, x: lambda: torch.inference_mode()(m)(x).clone(),
    ],
    ids=["detached", "inference_mode"],
)
@pytest.mark.parametrize("mode", ["auto", "double-backward"])
def test_predictions_that_do_not_depend_on_the_parameters_are_an_error(make_fn, mode):
    model, x, t = CASES["mlp"].make()
    opt = CurveBall(model, forward_mode=mode)
    before = flat_params(model)
    with pytest.raises(ValueError, match="do not depend on the optimized parameters"):
        opt.step(make_fn(model, x), cross_entropy(t))
    assert torch.equal(flat_params(model), before) and opt.steps == 0


class StopGradient(nn.Module):
    """A layer whose second half is computed under torch.no_grad() (a stop-gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(5, 6)
        self.c = nn.Linear(12, 3)

    def forward(self, x):
        with torch.no_grad():
            frozen = torch.tanh(self.b(x))
        return self.c(torch.cat([torch.tanh(self.a(x)), frozen], dim=1))


def test_no_grad_blocks_inside_the_model_are_the_same_function_on_both_paths():
    torch.manual_seed(0)
    model = StopGradient().double()
    twin = copy.deepcopy(model)
    x = torch.randn(16, 5, dtype=torch.float64)
    t = torch.randint(0, 3, (16,))
    fast, bare = CurveBall(model), CurveBall(twin.parameters())
    for _ in range(5):
        fast.step(lambda: model(x), cross_entropy(t))
        bare.step(lambda: twin(x), cross_entropy(t))
        torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=1e-10, atol=1e-12)
    assert fast.last.engine == "forward" and bare.last.engine == "double-backward"


class NoisyLayer(nn.Module):
    """Adds noise drawn from NumPy's and Python's global generators (or fixed noise)."""

    def __init__(self, fixed=None) -> None:
        super().__init__()
        self.fixed = fixed

    def forward(self, h):
        if self.fixed is not None:
            return h + self.fixed
        noise = np.random.standard_normal(h.shape) + random.gauss(0.0, 1.0)
        return h + torch.as_tensor(noise, dtype=h.dtype)


@pytest.mark.parametrize("mode", ["auto", "double-backward"])
def test_every_pass_sees_the_same_numpy_and_python_draws(mode):
    torch.manual_seed(3)
    base = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    t = torch.randint(0, 3, (8,))
    noisy = nn.Sequential(*copy.deepcopy(base)[:2], NoisyLayer(), copy.deepcopy(base)[2])
    np.random.seed(11)
    random.seed(12)
    opt = CurveBall(noisy, lambda_interval=1, forward_mode=mode)
    opt.step(lambda: noisy(x), cross_entropy(t))
    after = (np.random.standard_normal(), random.random())
    np.random.seed(11)
    random.seed(12)
    noise = torch.as_tensor(np.random.standard_normal((8, 6)) + random.gauss(0.0, 1.0))
    assert after == (np.random.standard_normal(), random.random())  # one pass's worth consumed
    fixed = nn.Sequential(*copy.deepcopy(base)[:2], NoisyLayer(noise), copy.deepcopy(base)[2])
    reference = CurveBall(fixed, lambda_interval=1, forward_mode=mode)
    reference.step(lambda: fixed(x), cross_entropy(t))
    torch.testing.assert_close(flat_params(noisy), flat_params(fixed), rtol=1e-12, atol=1e-14)
    assert opt.last.trust_ratio == pytest.approx(reference.last.trust_ratio, rel=1e-10)


def test_a_float32_loss_near_1e20_trains_like_the_unscaled_loss():
    model, x, t = CASES["mlp"].make(batch=32, dtype=torch.float32)
    # λ scales with the loss: the same method (the paper's; its inner products overflow)
    opt = CurveBall(model, lambd=1e20, precondition=False)
    scaled = train(model, opt, x, lambda y: 1e20 * F.cross_entropy(y, t), 12)
    model, x, t = CASES["mlp"].make(batch=32, dtype=torch.float32)
    reference = train(
        model, CurveBall(model, lambd=1.0, precondition=False), x, cross_entropy(t), 12
    )
    assert not any(s for s in [opt.last.skipped])
    np.testing.assert_allclose(np.array(scaled) / 1e20, reference, rtol=1e-3)


def test_a_float32_loss_near_1e30_trains_with_the_preconditioner():
    """Δz² overflows float32 here: the preconditioner's average saturates, steps stay finite."""
    model, x, t = CASES["mlp"].make(batch=32, dtype=torch.float32)
    opt = CurveBall(model, lambd=1e29)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no skipped step
        losses = train(model, opt, x, lambda y: 1e30 * F.cross_entropy(y, t), 12)
    averages = [opt.state[p]["dz_square_average"] for p in model.parameters()]
    assert all(torch.isfinite(v).all() for v in averages)
    assert max(float(v.max()) for v in averages) == torch.finfo(torch.float32).max
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0]  # as the unscaled loss does (1.07 → 0.72)


def test_bare_parameters_update_batch_norm_statistics_once_per_step():
    x = torch.randn(16, 5)
    model = CASES["bn_mlp"].make(dtype=torch.float32)[0]
    reference = copy.deepcopy(model)
    opt = CurveBall(model.parameters(), lambda_interval=1)  # a test pass at every step
    opt.step(lambda: model(x), lambda y: y.pow(2).mean())
    reference(x)  # one ordinary forward pass at the same (initial) parameters
    for (name, ours), theirs in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(ours, theirs), name
    for _ in range(9):
        opt.step(lambda: model(x), lambda y: y.pow(2).mean())
    assert model[1].num_batches_tracked.item() == 10


@pytest.mark.parametrize(
    "module", [nn.Embedding(10, 4, sparse=True), nn.EmbeddingBag(10, 4, sparse=True)]
)
def test_sparse_gradients_are_refused_at_construction_naming_the_module(module):
    model = nn.Sequential(module, nn.Linear(4, 2))
    with pytest.raises(ValueError, match="'0'.*sparse=True"):
        CurveBall(model)


def test_a_persistent_fault_warns_once_at_the_callers_line_and_records_every_step():
    model, x, t = CASES["mlp"].make(batch=8, dtype=torch.float32)
    x[3, 0] = float("nan")  # one poisoned sample, every step
    opt = CurveBall(model)
    reasons = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for _ in range(10):
            opt.step(lambda: model(x), cross_entropy(t))
            reasons.append(opt.last.reason)
    assert len(caught) == 1 and caught[0].filename == __file__
    assert reasons == ["non-finite loss"] * 10


def test_zero_damping_with_the_trust_region_rule_can_grow():
    model, x, t = CASES["mlp"].make(batch=8)
    opt = CurveBall(model, lambd=0.0, lambda_interval=1, lambda_thresholds=(0.99, 1e9))
    train(model, opt, x, cross_entropy(t), 3)
    assert opt.lambd > 0.0
