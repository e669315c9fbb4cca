"""Complex parameters: each one is its (real, imaginary) pair, as in ``torch.optim``.

The oracle is a twin of every model with each complex weight stored as two real
tensors and combined with ``torch.complex`` in the forward pass: the same function
of the same real numbers, which CurveBall already handles.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.oracles import dense_problem
from curveball import CurveBall
from curveball.losses import mse_loss

MODES = 4


class Spectral(nn.Module):
    """A 1-D spectral convolution (the Fourier layer of an FNO) and a real head; with
    ``split`` its complex weight is kept as two real tensors."""

    def __init__(self, channels: int = 3, width: int = 16, split: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(channels, channels, MODES, dtype=torch.cdouble, generator=g) / 3
        self.split = split
        if split:
            self.re, self.im = nn.Parameter(weight.real.clone()), nn.Parameter(weight.imag.clone())
        else:
            self.weight = nn.Parameter(weight)
        self.head = nn.Linear(channels * width, 2, dtype=torch.float64)

    def complex_weight(self):
        return torch.complex(self.re, self.im) if self.split else self.weight

    def forward(self, x):
        spectrum = torch.fft.rfft(x, dim=-1)[..., :MODES]
        mixed = torch.einsum("bim,iom->bom", spectrum, self.complex_weight())
        y = torch.fft.irfft(mixed, n=x.shape[-1], dim=-1)
        return self.head(torch.tanh(y).flatten(1))


class ComplexLinear(nn.Module):
    """``Re`` and ``Im`` of a complex linear map of a complex embedding of the input."""

    def __init__(self, split: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        weight = torch.randn(3, 5, dtype=torch.cdouble, generator=g) / 2
        bias = torch.randn(3, dtype=torch.cdouble, generator=g) / 2
        self.split = split
        if split:
            self.wr, self.wi = nn.Parameter(weight.real.clone()), nn.Parameter(weight.imag.clone())
            self.br, self.bi = nn.Parameter(bias.real.clone()), nn.Parameter(bias.imag.clone())
        else:
            self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)

    def forward(self, x):
        if self.split:
            w, b = torch.complex(self.wr, self.wi), torch.complex(self.br, self.bi)
        else:
            w, b = self.weight, self.bias
        z = F.linear(torch.complex(x, torch.sin(x)), w, b)
        return torch.view_as_real(torch.tanh(z)).flatten(1)


BUILDERS = {"spectral": (Spectral, (8, 3, 16)), "complex linear": (ComplexLinear, (8, 5))}


def problem(name: str, split: bool):
    build, shape = BUILDERS[name]
    torch.manual_seed(2)
    model = build(split=split)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = torch.randn_like(model(x))
    return model, x, mse_loss(target)


def pairs(model: nn.Module) -> torch.Tensor:
    """The parameters as the twin orders its real numbers."""
    out = []
    for p in model.parameters():
        out += [p.real.reshape(-1), p.imag.reshape(-1)] if p.is_complex() else [p.reshape(-1)]
    return torch.cat([t.detach() for t in out])


def state_pairs(opt: CurveBall, model: nn.Module, key: str = "z") -> torch.Tensor:
    out = []
    for p in model.parameters():
        v = opt.state[p][key]
        out += [v.real.reshape(-1), v.imag.reshape(-1)] if v.is_complex() else [v.reshape(-1)]
    return torch.cat(out)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_z_converges_to_the_damped_newton_step_of_the_real_pairs(name):
    model, x, loss_fn = problem(name, split=False)
    twin, _, _ = problem(name, split=True)
    assert torch.equal(pairs(model), torch.cat([p.detach().reshape(-1) for p in
                                                 _twin_order(twin)]))  # fmt: skip
    size = sum(2 * p.numel() if p.is_complex() else p.numel() for p in model.parameters())
    opt = CurveBall(model, lr=0.0, lambd=1.0, auto_lambda=False, precondition=False,
                    forward_mode="forward", inner_steps=size, solver="conjugate")  # fmt: skip
    opt.step(lambda: model(x), loss_fn)  # conjugate gradients: exact in `size` iterations
    dense = dense_problem(twin, x, loss_fn)
    order = _twin_permutation(twin)
    n = dense["w"].numel()
    newton = -torch.linalg.solve(dense["G"] + torch.eye(n, dtype=torch.float64), dense["g"])
    newton = newton[order]
    assert (state_pairs(opt, model) - newton).norm() <= 1e-10 * newton.norm()


def _twin_order(twin: nn.Module) -> list[torch.Tensor]:
    return [p for _, p in sorted(twin.named_parameters(), key=lambda kv: _rank(twin, kv[0]))]


def _rank(twin: nn.Module, name: str) -> int:
    order = {"re": 0, "im": 1, "wr": 0, "wi": 1, "br": 2, "bi": 3}
    return order.get(name, 10 + list(dict(twin.named_parameters())).index(name))


def _twin_permutation(twin: nn.Module) -> torch.Tensor:
    """Indices that reorder the twin's flat parameters into :func:`pairs`' order."""
    sizes = {n: p.numel() for n, p in twin.named_parameters()}
    starts, offset = {}, 0
    for n in sizes:
        starts[n], offset = offset, offset + sizes[n]
    ordered = [n for n, _ in sorted(twin.named_parameters(), key=lambda kv: _rank(twin, kv[0]))]
    return torch.cat([torch.arange(starts[n], starts[n] + sizes[n]) for n in ordered])


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("options", [{}, {"weight_decay": 1e-2, "lambda_interval": 2},
                                     {"precondition": "gauss-newton"}])  # fmt: skip
def test_the_trajectory_equals_the_real_twins(name, options):
    model, x, loss_fn = problem(name, split=False)
    twin, _, _ = problem(name, split=True)
    a, b = CurveBall(model, **options), CurveBall(twin, **options)
    order = _twin_permutation(twin)
    # the dense preconditioner's eigendecomposition sees the pairs in another order, which
    # changes its rounding: there the trajectories agree to 1e-9, elsewhere to 1e-12
    rtol = 1e-9 if options.get("precondition") == "gauss-newton" else 1e-12
    for _ in range(10):
        la, _ = a.step(lambda: model(x), loss_fn)
        lb, _ = b.step(lambda: twin(x), loss_fn)
        assert la.item() == pytest.approx(lb.item(), rel=rtol, abs=1e-14)
        twin_flat = torch.cat([p.detach().reshape(-1) for p in twin.parameters()])
        torch.testing.assert_close(pairs(model), twin_flat[order], rtol=rtol, atol=rtol / 10)
        twin_z = torch.cat([b.state[p]["z"].reshape(-1) for p in twin.parameters()])
        torch.testing.assert_close(state_pairs(a, model), twin_z[order], rtol=rtol, atol=rtol / 10)
        assert a.lambd == pytest.approx(b.lambd, rel=1e-12)


def test_a_complex64_model_trains_under_autocast():
    model, x, loss_fn = problem("spectral", split=False)
    model = model.to(torch.complex64).float() if False else _single(model)
    x, opt = x.float(), CurveBall(model)
    target = loss_fn.target.float()
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = opt.step(lambda: model(x), mse_loss(target))
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert opt.state[model.weight]["z"].dtype == torch.complex64


def _single(model: Spectral) -> Spectral:
    with torch.no_grad():
        model.weight = nn.Parameter(model.weight.to(torch.complex64))
    return model.float()


def test_a_state_dict_resumes_exactly():
    model, x, loss_fn = problem("spectral", split=False)
    opt = CurveBall(model, lambda_interval=2)
    for _ in range(3):
        opt.step(lambda: model(x), loss_fn)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for _ in range(3):
        opt.step(lambda: model(x), loss_fn)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    fresh, _, _ = problem("spectral", split=False)
    fresh.load_state_dict(saved["model"])
    resumed = CurveBall(fresh, lambda_interval=2)
    resumed.load_state_dict(saved["opt"])
    assert resumed.state[fresh.weight]["dz_square_average"].dtype == torch.cdouble
    for _ in range(3):
        resumed.step(lambda: fresh(x), loss_fn)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_complex_loss_is_refused_and_an_unused_complex_parameter_stays_put():
    model, x, _ = problem("complex linear", split=False)
    model.unused = nn.Parameter(torch.ones(2, dtype=torch.cdouble))
    opt = CurveBall(model)
    with pytest.raises(TypeError, match="real loss"):
        opt.step(lambda: model(x), lambda y: y.sum() * 1j)
    for _ in range(3):
        opt.step(lambda: model(x), lambda y: (y**2).mean())
    assert not opt.state[model.unused]["z"].any()
    assert torch.equal(model.unused.detach(), torch.ones(2, dtype=torch.cdouble))


def test_a_non_finite_spectral_output_changes_nothing():
    model, x, loss_fn = problem("spectral", split=False)
    opt = CurveBall(model)
    for _ in range(2):
        opt.step(lambda: model(x), loss_fn)
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    bad = x.clone()
    bad[0, 0, 0] = math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step(lambda: model(bad), loss_fn)
    assert opt.last.skipped
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[0][name])
    for index, p in enumerate(model.parameters()):
        assert torch.equal(opt.state[p]["z"], before[1]["state"][index]["z"])
