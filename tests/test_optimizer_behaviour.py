"""CurveBall as a torch.optim optimizer: checkpoints, modules with state or randomness, groups."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from cases import CASES, NoForwardModeSquare
from torch import nn

from benchmarks.oracles import flat_params
from curveball import CurveBall


def bn_model(seed: int = 0) -> nn.Module:
    return CASES["bn_mlp"].make(seed, dtype=torch.float32)[0]


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)
    ]


def run(model, opt, data):
    losses = []
    for x, t in data:
        loss, _ = opt.step(lambda x=x: model(x), lambda y, t=t: F.cross_entropy(y, t))
        losses.append(loss.item())
    return losses


def test_checkpoint_resume_continues_the_exact_loss_sequence():
    data = batches(14)
    model = bn_model()
    opt = CurveBall(model, weight_decay=1e-3, step_size_interval=2)
    full = run(model, opt, data)

    model = bn_model()
    opt = CurveBall(model, weight_decay=1e-3, step_size_interval=2)
    first = run(model, opt, data[:7])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    fresh = bn_model(seed=123)  # different initial values, overwritten by the checkpoint
    fresh.load_state_dict(saved["model"])
    fresh_opt = CurveBall(fresh, weight_decay=1e-3, step_size_interval=2)
    fresh_opt.load_state_dict(saved["opt"])
    assert fresh_opt.lambd == opt.lambd and fresh_opt.steps == 7
    rest = run(fresh, fresh_opt, data[7:])
    assert first + rest == full


def test_batch_norm_statistics_move_exactly_as_in_one_forward_pass():
    x, _ = batches(1)[0]
    model = bn_model()
    reference = copy.deepcopy(model)
    opt = CurveBall(model, lambda_interval=1)  # a trust-region test pass at every step
    opt.step(lambda: model(x), lambda y: y.pow(2).mean())
    reference(x)  # one ordinary training-mode forward pass
    for (name, ours), theirs in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(ours, theirs), name


class RandomMask(nn.Module):
    """Multiplies by a fresh Bernoulli mask at every call (like dropout, without rescaling)."""

    def __init__(self, fixed: torch.Tensor | None = None) -> None:
        super().__init__()
        self.fixed = fixed

    def forward(self, x):
        if self.fixed is not None:
            return x * self.fixed
        return x * torch.bernoulli(torch.full_like(x, 0.5))


def masked_model(mask_module: nn.Module) -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), mask_module, nn.Linear(10, 3)).double()


@pytest.mark.parametrize("mode", ["auto", "double-backward"])
def test_every_pass_of_a_step_sees_the_same_random_draw(mode):
    x = torch.randn(16, 6, dtype=torch.float64)
    t = torch.randint(0, 3, (16,))
    random_model = masked_model(RandomMask())
    opt = CurveBall(random_model, lambda_interval=1, forward_mode=mode)
    torch.manual_seed(99)
    opt.step(lambda: random_model(x), lambda y: F.cross_entropy(y, t))
    after_step = torch.rand(3)

    # Oracle: the same mask drawn once and frozen into a deterministic model.
    torch.manual_seed(99)
    mask = torch.bernoulli(torch.full((16, 10), 0.5, dtype=torch.float64))
    after_one_forward = torch.rand(3)
    fixed_model = masked_model(RandomMask(fixed=mask))
    fixed_opt = CurveBall(fixed_model, lambda_interval=1, forward_mode=mode)
    fixed_opt.step(lambda: fixed_model(x), lambda y: F.cross_entropy(y, t))

    assert (opt.last.rho, opt.last.beta, opt.last.trust_ratio) == pytest.approx(
        (fixed_opt.last.rho, fixed_opt.last.beta, fixed_opt.last.trust_ratio), rel=1e-12
    )
    torch.testing.assert_close(
        flat_params(random_model), flat_params(fixed_model), rtol=1e-12, atol=0
    )
    # a step consumes exactly the randomness of one forward pass
    assert torch.equal(after_step, after_one_forward)


def test_dropout_model_trains_in_train_and_eval_mode():
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    t = (x[:, 0] > 0).long()
    for train in (True, False):
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
        model.train(train)
        opt = CurveBall(model)
        losses = run(model, opt, [(x, t)] * 25)
        assert losses[-1] < 0.5 * losses[0]


def test_frozen_parameters_are_left_alone():
    model = bn_model()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.clone()
    opt = CurveBall(model)
    run(model, opt, batches(3))
    assert torch.equal(model[0].weight, frozen)
    assert "z" not in opt.state[model[0].weight]
    assert opt.state[model[3].weight]["z"].abs().sum() > 0


def test_per_group_learning_rates_and_schedulers():
    model = bn_model()
    groups = [
        {"params": model[0].parameters(), "lr": 0.0},
        {"params": list(model[1].parameters()) + list(model[3].parameters())},
    ]
    opt = CurveBall(groups, model=model)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = model[0].weight.clone()
    w3 = model[3].weight.detach().clone()
    x, t = batches(1)[0]
    opt.step(lambda: model(x), lambda y: F.cross_entropy(y, t))
    scheduler.step()
    assert torch.equal(model[0].weight, before)
    assert opt.param_groups[1]["lr"] == 0.5
    # w ← w + α z with α = 1 at the first step
    torch.testing.assert_close(model[3].weight, w3 + opt.state[model[3].weight]["z"])
    w3 = model[3].weight.detach().clone()
    opt.step(lambda: model(x), lambda y: F.cross_entropy(y, t))
    torch.testing.assert_close(model[3].weight, w3 + 0.5 * opt.state[model[3].weight]["z"])


class SquareLayer(nn.Module):
    def forward(self, x):
        return NoForwardModeSquare.apply(x)


def test_missing_forward_formula_falls_back_once_with_one_warning():
    torch.manual_seed(1)
    x = torch.randn(8, 4, dtype=torch.float64)
    t = torch.randn(8, 2, dtype=torch.float64)
    make = lambda: nn.Sequential(nn.Linear(4, 5), SquareLayer(), nn.Linear(5, 2)).double()  # noqa: E731
    torch.manual_seed(2)
    model = make()
    torch.manual_seed(2)
    twin = make()
    opt = CurveBall(model)
    reference = CurveBall(twin, forward_mode="double-backward")
    with pytest.warns(RuntimeWarning, match="forward-mode AD failed") as record:
        for _ in range(4):
            opt.step(lambda: model(x), lambda y: F.mse_loss(y, t))
    assert len([w for w in record if "forward-mode" in str(w.message)]) == 1
    for _ in range(4):
        reference.step(lambda: twin(x), lambda y: F.mse_loss(y, t))
    torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=1e-10, atol=1e-12)
    strict_model = make()
    strict = CurveBall(strict_model, forward_mode="forward")
    with pytest.raises(RuntimeError, match="forward mode"):
        strict.step(lambda: strict_model(x), lambda y: F.mse_loss(y, t))


def test_ddp_wrapper_is_refused_with_advice():
    class FakeDDP(nn.parallel.DistributedDataParallel):
        def __init__(self):  # no process group needed to test the type check
            nn.Module.__init__(self)

    with pytest.raises(TypeError, match=r"\.module"):
        CurveBall(FakeDDP())


def test_z_buffers_are_updated_in_place_and_laid_out_like_their_parameters():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 3))
    model[0].weight.data = model[0].weight.data.contiguous(memory_format=torch.channels_last)
    opt = CurveBall(model)
    x, t = torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))
    opt.step(lambda: model(x), lambda y: F.cross_entropy(y, t))
    buffers = {p: opt.state[p]["z"] for p in model.parameters()}
    for _ in range(6):  # crosses a trust-region test (step 5)
        opt.step(lambda: model(x), lambda y: F.cross_entropy(y, t))
    for p, z in buffers.items():
        assert opt.state[p]["z"] is z  # like momentum buffers: the same tensors, updated
        assert z.stride() == p.stride() and z.abs().sum() > 0


@pytest.mark.parametrize(
    "stored, reused",
    [((0.7, 1e-3), True), ((1.0, 0.0), True), ((-1.6, 1e-3), False), ((1.3, 1e-3), False),
     ((0.7, -1e-4), False)],
)  # fmt: skip
def test_reused_step_sizes_are_only_contractions(stored, reused):
    """Between solves (step_size_interval) the last ρ, β are reused only if 0 ≤ ρ ≤ 1 and
    β ≥ 0; the exact minimiser of one step's plane may be anything, and a negative ρ
    reused on later planes made z grow geometrically."""
    data = batches(3)
    model = bn_model()
    opt = CurveBall(model, step_size_interval=10, auto_lambda=False)
    run(model, opt, data[:1])
    assert opt.last.refreshed
    opt.curveball_state.rho, opt.curveball_state.beta = stored
    run(model, opt, data[1:2])
    assert opt.last.refreshed is not reused
    assert ((opt.last.rho, opt.last.beta) == stored) is reused
    rho, beta = opt.curveball_state.sizes
    run(model, opt, data[2:])  # what the second step solved or reused, the third judges alike
    assert opt.last.refreshed is not (0.0 <= rho <= 1.0 and beta >= 0.0)
