"""Model functions with input derivatives: exact products in forward mode on every pass.

The oracle is :func:`benchmarks.residual_zoo.dense_residual_problem`: the dense
Jacobian of the ``torch.func`` form of each residual by ``jacrev``, apart from
the library. Each family is checked written both ways (``autograd.grad`` and
``torch.func``).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from benchmarks.residual_zoo import RESIDUAL_ZOO, WAYS, dense_residual_problem, tanh_mlp
from curveball import CurveBall, ggn_vector_product
from curveball._curvature.engine_choice import EngineChoice
from curveball._curvature.module_tensors import ModuleTensors

CASES = [(name, way) for name in RESIDUAL_ZOO for way in WAYS]


def half_squares(r: torch.Tensor) -> torch.Tensor:
    return 0.5 * (r**2).sum()


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def random_vector(model, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]


@pytest.mark.parametrize("name", sorted(RESIDUAL_ZOO))
def test_both_ways_compute_the_same_residual(name):
    family = RESIDUAL_ZOO[name]
    model, pts = family.make()
    a, b = (family.model_fn(model, pts, way)() for way in WAYS)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "way"), CASES)
def test_the_gauss_newton_product_equals_the_dense_oracle(name, way):
    family = RESIDUAL_ZOO[name]
    model, pts = family.make()
    params = list(model.parameters())
    v = random_vector(model, 3)
    gv = ggn_vector_product(
        family.model_fn(model, pts, way), half_squares, params, v, module=model,
        forward_mode="forward",
    )  # fmt: skip
    dense = dense_residual_problem(family, model, pts)
    expected = dense["G"] @ flat(v)
    assert (flat(gv) - expected).norm() <= 1e-10 * expected.norm()


@pytest.mark.parametrize(("name", "way"), CASES)
def test_both_forward_mode_passes_and_the_evaluation_are_exact(name, way):
    family = RESIDUAL_ZOO[name]
    model, pts = family.make()
    params = list(model.parameters())
    choice = EngineChoice(params, ModuleTensors(model, params), "forward")
    t1, t2 = random_vector(model, 1), random_vector(model, 2)
    dense = dense_residual_problem(family, model, pts)

    def passes(engine):
        y, j1 = engine.linearize(family.model_fn(model, pts, way), t1)
        back = engine.vjp(torch.ones_like(y))
        return y.detach(), j1, back, engine.jvp(t2), engine.evaluate()

    try:
        y, j1, back, j2, evaluated = choice.run(passes, lambda: None)
    finally:
        choice.engine.finish()
    for got, expected in ((j1, dense["J"] @ flat(t1)), (j2, dense["J"] @ flat(t2)),
                          (flat(back), dense["J"].sum(0)), (y, dense["r"])):  # fmt: skip
        assert (got - expected).norm() <= 1e-10 * expected.norm()
    torch.testing.assert_close(evaluated, y, rtol=1e-13, atol=1e-13)
    assert not evaluated.requires_grad
    if way == "autograd":  # recognised, and computed with dual tensors, not torch.func.jvp
        assert choice.traits.input_derivatives and not choice.traits.nested_forward


@pytest.mark.parametrize("name", ["poisson 2d", "biharmonic 2d"])
def test_z_converges_to_the_damped_newton_step_in_forward_mode(name, way="autograd"):
    family = RESIDUAL_ZOO[name]
    model, pts = family.make()
    lambd = 1.0
    opt = CurveBall(model, lr=0.0, lambd=lambd, auto_lambda=False, precondition=False,
                    forward_mode="forward")  # fmt: skip
    for _ in range(150):
        opt.step(family.model_fn(model, pts, way), half_squares)
    dense = dense_residual_problem(family, model, pts)
    n = dense["w"].numel()
    newton = -torch.linalg.solve(dense["G"] + lambd * torch.eye(n, dtype=torch.float64), dense["g"])
    z = flat(opt.state[p]["z"] for p in model.parameters())
    assert (z - newton).norm() <= 1e-8 * newton.norm()


def test_training_with_trust_region_tests_is_the_same_on_every_path_and_warns_nothing():
    family = RESIDUAL_ZOO["heat 1d"]
    runs = {}
    for way in WAYS:
        for mode in ("forward", "double-backward"):
            model, pts = family.make()
            opt = CurveBall(model, lambda_interval=2, forward_mode=mode)
            losses, ratios = [], []
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                for _ in range(12):
                    losses.append(opt.step(family.model_fn(model, pts, way), half_squares)[0])
                    ratios.append(opt.last.trust_ratio)
            assert opt.last.engine == mode
            runs[way, mode] = torch.stack(losses)
            assert all(math.isfinite(r) for r in ratios[1::2])  # every test measured
    reference = runs["autograd", "forward"]
    assert reference[-1] < 0.7 * reference[0]
    for losses in runs.values():
        torch.testing.assert_close(losses, reference, rtol=1e-9, atol=0.0)


def test_points_without_requires_grad_get_an_error_that_says_so():
    model = tanh_mlp((2, 6, 1)).double()
    x = torch.rand(5, 2, dtype=torch.float64)  # forgot requires_grad_()

    def model_fn():
        u = model(x).squeeze(-1)
        (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        return g[:, 0]

    opt = CurveBall(model)
    with pytest.raises(ValueError, match=r"requires_grad=True"):
        opt.step(model_fn, half_squares)
    assert opt.steps == 0


def test_a_residual_that_ignores_the_parameters_is_refused():
    model = tanh_mlp((2, 6, 1)).double()
    x = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)

    def model_fn():  # depends on the points (which require grad), not on the network
        return (x**2).sum(1)

    for mode in ("forward", "double-backward"):
        with pytest.raises(ValueError, match="do not depend on the optimized parameters"):
            CurveBall(model, forward_mode=mode).step(model_fn, half_squares)


@pytest.mark.parametrize("way", WAYS)
def test_a_non_finite_residual_leaves_model_and_state_untouched(way):
    family = RESIDUAL_ZOO["poisson 2d"]
    model, pts = family.make()
    opt = CurveBall(model)
    for _ in range(3):
        opt.step(family.model_fn(model, pts, way), half_squares)
    before = [p.detach().clone() for p in model.parameters()]
    zs = [opt.state[p]["z"].clone() for p in model.parameters()]
    lambd = opt.lambd

    def broken():
        r = family.model_fn(model, pts, way)()
        return torch.cat([r[:-1], r[-1:] * math.inf])

    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(broken, half_squares)
    assert opt.last.skipped
    for p, b, z in zip(model.parameters(), before, zs, strict=True):
        assert torch.equal(p, b) and torch.equal(opt.state[p]["z"], z)
    assert opt.lambd >= lambd
