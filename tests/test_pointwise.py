"""Residuals written point by point: their values and per-point Jacobian against the batched
residual the user's way (``autograd.grad``, differentiated by ``torch.autograd.functional``),
and the exact solver they switch on."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev

from curveball import FULL_BATCH_DEFAULTS, CurveBall, PointwiseResidual, Term, _products
from curveball import pointwise as pointwise_module
from curveball._curvature import jacobian_matrix
from curveball._hyperparameters import EXACT_DAMPING


def network(seed: int = 0, outputs: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, outputs)).double()


def points(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def forcing(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(math.pi * x[..., 0]) * torch.cos(x[..., 1])


INTERIOR, BOUNDARY = points(11, 1), points(5, 2)


def poisson_pointwise(model: nn.Module) -> PointwiseResidual:
    """−Δu − f inside, u on the boundary; the Laplacian by ``torch.func.hessian``."""

    def interior(u, x):
        return -hessian(lambda y: u(y).squeeze())(x).trace() - forcing(x)

    def boundary(u, x):
        return u(x).squeeze()

    return PointwiseResidual(model, [Term(interior, INTERIOR, 0.5), (boundary, BOUNDARY, 2.0)])


def poisson_batched(model: nn.Module) -> torch.Tensor:
    """The same residual the user's way: ``autograd.grad`` twice on the batch."""
    x = INTERIOR.clone().requires_grad_(True)
    u = model(x).squeeze(-1)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    laplacian = sum(
        torch.autograd.grad(du[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(2)
    )
    interior = (-laplacian - forcing(INTERIOR)) * 0.5
    return torch.cat([interior, model(BOUNDARY).squeeze(-1) * 2.0])


def sobolev_pointwise(model: nn.Module) -> PointwiseResidual:
    """Values and input gradients of a two-output net at each point (a vector residual)."""

    def term(u, x):
        return torch.cat([u(x) - forcing(x), jacrev(u)(x).reshape(-1)])

    return PointwiseResidual(model, [Term(term, INTERIOR)])


def sobolev_batched(model: nn.Module) -> torch.Tensor:
    x = INTERIOR.clone().requires_grad_(True)
    u = model(x)
    grads = [torch.autograd.grad(u[:, k].sum(), x, create_graph=True)[0] for k in range(2)]
    per_point = torch.cat([u - forcing(INTERIOR)[:, None], torch.stack(grads, 1).flatten(1)], 1)
    return per_point.reshape(-1)


def batched_jacobian(model: nn.Module, residual) -> torch.Tensor:
    """The oracle: ``torch.autograd.functional.jacobian`` of the batched residual."""
    names = [name for name, _ in model.named_parameters()]
    values = tuple(p.detach().clone() for p in model.parameters())

    def of(*params):
        weights = dict(zip(names, params, strict=True))
        with _substituted(model, weights):
            return residual(model)

    blocks = torch.autograd.functional.jacobian(of, values)
    return torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=1)


class _substituted:
    """Run the body with ``weights`` (by name) in place of the module's parameters."""

    def __init__(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        self.model, self.weights, self.saved = model, weights, {}

    def __enter__(self) -> None:
        for name, value in self.weights.items():
            module_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            self.saved[name] = module._parameters[attr]
            module._parameters[attr] = value

    def __exit__(self, *exc) -> None:
        for name, value in self.saved.items():
            module_name, _, attr = name.rpartition(".")
            self.model.get_submodule(module_name)._parameters[attr] = value


CASES = {
    "poisson": (network, poisson_pointwise, poisson_batched),
    "sobolev": (lambda: network(outputs=2), sobolev_pointwise, sobolev_batched),
}


@pytest.mark.parametrize("points_per_pass", [None, 3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_values_and_jacobian_equal_the_batched_residual(monkeypatch, name, points_per_pass):
    build, pointwise, batched = CASES[name]
    model = build()
    if points_per_pass is not None:  # the per-point passes in batches of 3 points
        size = sum(p.numel() for p in model.parameters())
        monkeypatch.setattr(pointwise_module, "JACOBIAN_CHUNK", points_per_pass * size)
    residual = pointwise(model)
    torch.testing.assert_close(residual(), batched(model), rtol=0, atol=1e-12)
    jac = residual.jacobian(list(model.parameters()))
    assert jac.dtype == torch.float64
    torch.testing.assert_close(jac, batched_jacobian(model, batched), rtol=0, atol=1e-10)


def test_the_jacobian_of_some_parameters_is_their_columns_in_their_order():
    model = network()
    residual = poisson_pointwise(model)
    params = list(model.parameters())
    full = residual.jacobian(params)
    sizes = [p.numel() for p in params]
    columns = torch.split(full, sizes, dim=1)
    torch.testing.assert_close(residual.jacobian([params[2], params[0]]),
                               torch.cat([columns[2], columns[0]], dim=1))  # fmt: skip


@pytest.mark.parametrize("points_per_pass", [None, 3])
def test_terms_of_different_widths_stack_their_rows_in_order(monkeypatch, points_per_pass):
    model = network(outputs=2)
    if points_per_pass is not None:
        size = sum(p.numel() for p in model.parameters())
        monkeypatch.setattr(pointwise_module, "JACOBIAN_CHUNK", points_per_pass * size)
    values = Term(lambda u, x: u(x)[0] - forcing(x), BOUNDARY, 0.5)  # one entry a point
    sobolev = sobolev_pointwise(model).terms[0]  # six entries a point
    params = list(model.parameters())
    parts = [PointwiseResidual(model, [t]).linearize(params) for t in (sobolev, values)]
    r, jac = PointwiseResidual(model, [sobolev, values]).linearize(params)
    assert jac.shape == (len(INTERIOR) * 6 + len(BOUNDARY), sum(p.numel() for p in params))
    torch.testing.assert_close(r, torch.cat([parts[0][0], parts[1][0]]), rtol=0, atol=0)
    torch.testing.assert_close(jac, torch.cat([parts[0][1], parts[1][1]]), rtol=0, atol=0)


def test_the_jacobian_is_written_into_scratch_memory_that_is_large_enough():
    model = network()
    residual, params = poisson_pointwise(model), list(model.parameters())
    expected = batched_jacobian(model, poisson_batched)
    scratch = torch.full((expected.numel() + 7,), math.nan, dtype=torch.float64)
    _, jac = residual.linearize(params, out=scratch)
    assert jac.data_ptr() == scratch.data_ptr()
    torch.testing.assert_close(jac, expected, rtol=0, atol=1e-10)
    for unusable in (scratch[:5], scratch.float()):  # too small, or not float64: fresh memory
        _, jac = residual.linearize(params, out=unusable)
        assert jac.data_ptr() != unusable.data_ptr()
        torch.testing.assert_close(jac, expected, rtol=0, atol=1e-10)


def test_the_engine_reuses_the_memory_of_the_last_jacobian():
    model = network()
    opt = CurveBall(model, **FULL_BATCH_DEFAULTS)
    engine = jacobian_matrix.JacobianMatrixEngine(list(model.parameters()))
    zeros = [torch.zeros_like(p) for p in model.parameters()]
    engine.linearize(poisson_pointwise(model), zeros)
    first = engine.matrix.data_ptr()
    engine.finish()
    assert engine.matrix is None
    opt.param_groups[0]["params"][0].data.add_(0.1)  # a new point: a new J, same memory
    engine.linearize(poisson_pointwise(model), zeros)
    assert engine.matrix.data_ptr() == first
    expected = batched_jacobian(model, poisson_batched)
    torch.testing.assert_close(engine.matrix, expected, rtol=0, atol=1e-10)


def half_squared_norm(r: torch.Tensor) -> torch.Tensor:
    return 0.5 * r.square().sum()


def test_an_exact_step_is_the_same_from_either_residual():
    """``solver="exact"`` on the batched residual forms J by forward-mode columns; on the
    point-by-point one from its per-point Jacobian: the same step (compared in J's range,
    J Δw: the Gramian is singular to rounding at λ = 1e-10, so Δw itself is not fixed)."""
    first, second = network(), network()
    jac = poisson_pointwise(first).jacobian(list(first.parameters()))
    before = torch.cat([p.detach().reshape(-1) for p in first.parameters()])
    moves = []
    for model, model_fn in ((first, lambda: poisson_batched(first)),
                            (second, poisson_pointwise(second))):  # fmt: skip
        opt = CurveBall(model, **{**FULL_BATCH_DEFAULTS, "solver": "exact"})
        opt.step(model_fn, half_squared_norm)
        moves.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before)
    torch.testing.assert_close(jac @ moves[0], jac @ moves[1], rtol=1e-8, atol=1e-12)


def test_an_exact_step_is_the_gauss_newton_step_of_least_squares():
    """J Δw equals J times −(JᵀJ + 10⁻¹⁰ I)⁻¹ Jᵀ r at the line search's step length (the
    comparison in J's range: the Gramian is singular to rounding, so Δw itself is not)."""
    model = network()
    before = [p.detach().clone() for p in model.parameters()]
    residual = poisson_pointwise(model)
    jac, r = residual.jacobian(list(model.parameters())), residual().detach()
    opt = CurveBall(model, **FULL_BATCH_DEFAULTS)
    opt.step(residual, half_squared_norm)
    assert opt.last.lambd == EXACT_DAMPING and opt.last.inner_steps == 1
    gramian = jac.T @ jac + EXACT_DAMPING * torch.eye(jac.shape[1], dtype=torch.float64)
    newton = -torch.linalg.solve(gramian, jac.T @ r)
    moved = torch.cat(
        [(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before, strict=True)]
    )
    length = opt.last.step_length
    torch.testing.assert_close(jac @ moved, length * (jac @ newton), rtol=1e-6, atol=1e-9)


def test_the_exact_solver_leaves_the_rules_damping_alone():
    model = network()
    opt = CurveBall(model, **{**FULL_BATCH_DEFAULTS, "lambd": 0.3})
    residual = poisson_pointwise(model)
    for _ in range(3):
        opt.step(residual, half_squared_norm)
        assert opt.last.lambd == EXACT_DAMPING and opt.lambd == 0.3


def test_auto_takes_the_exact_solver_only_where_the_jacobian_comes_with_the_model_function():
    model = network()
    opt = CurveBall(model, **FULL_BATCH_DEFAULTS)
    opt.step(lambda: poisson_batched(model), half_squared_norm)  # a plain model function
    assert opt.last.lambd == FULL_BATCH_DEFAULTS["lambd"] and opt.last.inner_steps > 1
    assert opt.last.solver == "conjugate"
    opt.step(poisson_pointwise(model), half_squared_norm)
    assert opt.last.solver == "exact" and opt.last.engine == "jacobian"
    big = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 32)).double()  # D > 2048
    opt = CurveBall(big, **FULL_BATCH_DEFAULTS)
    opt.step(PointwiseResidual(big, [(lambda u, x: u(x), INTERIOR)]), half_squared_norm)
    assert opt.last.lambd == FULL_BATCH_DEFAULTS["lambd"]


def test_pointwise_training_reaches_the_least_squares_fit_of_a_linear_model():
    """On a model linear in θ the Gauss-Newton step is Newton's: one exact step from any
    start lands on the least-squares solution (to the line search's full length)."""
    torch.manual_seed(3)
    model = nn.Linear(2, 1).double()
    target = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    x = points(9, 4)
    residual = PointwiseResidual(model, [(lambda u, p: u(p) - target[0] - p @ target[1:], x)])
    opt = CurveBall(model, **FULL_BATCH_DEFAULTS)
    opt.step(residual, half_squared_norm)
    got = torch.cat([model.bias.detach(), model.weight.detach().reshape(-1)])
    torch.testing.assert_close(got, target, rtol=0, atol=1e-8)


# --------------------------------------------------------------------------- bad input
def test_bad_terms_get_clear_errors():
    model = network()
    with pytest.raises(TypeError, match="nn.Module"):
        PointwiseResidual(lambda x: x, [(lambda u, x: u(x), INTERIOR)])
    with pytest.raises(ValueError, match="at least one term"):
        PointwiseResidual(model, [])
    with pytest.raises(TypeError, match=r"terms\[0\]: expected a Term"):
        PointwiseResidual(model, [lambda u, x: u(x)])
    with pytest.raises(TypeError, match="fn must be callable"):
        PointwiseResidual(model, [(1.0, INTERIOR)])
    with pytest.raises(TypeError, match="points must be a tensor"):
        PointwiseResidual(model, [(lambda u, x: u(x), [[0.0, 1.0]])])
    with pytest.raises(ValueError, match="at least one point"):
        PointwiseResidual(model, [(lambda u, x: u(x), INTERIOR[:0])])


def test_a_residual_of_another_module_is_refused_and_nothing_moves():
    model, other = network(), network(seed=1)
    opt = CurveBall(model, **FULL_BATCH_DEFAULTS)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="not a parameter of the residual's model"):
        opt.step(poisson_pointwise(other), half_squared_norm)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_a_complex_parameter_is_refused_by_the_jacobian():
    model = nn.Linear(2, 1, dtype=torch.complex128)
    residual = PointwiseResidual(model, [(lambda u, x: torch.view_as_real(u(x)), INTERIOR)])
    with pytest.raises(ValueError, match="complex"):
        residual.jacobian(list(model.parameters()))


def test_the_exact_solver_refuses_a_curvature_mini_batch():
    with pytest.raises(ValueError, match="solver='exact' do not combine"):
        CurveBall(network(), solver="exact", curvature_fraction=0.5)


@pytest.mark.parametrize("precondition", ["auto", "nystrom"])
@pytest.mark.parametrize("limit", [None, 1])
def test_products_from_the_jacobian_give_the_step_of_products_from_passes(
    monkeypatch, limit, precondition
):
    """Ten preconditioned conjugate iterations (``solver="conjugate"``; preconditioned by the
    dense Gauss-Newton matrix, or by its Nyström sketch, ``Jᵀ H_L (J Ω)`` at once from ``J``):
    with the products J t and Jᵀ u from the residual's Jacobian (engine ``"jacobian"``),
    and with them from passes through the model (the batched residual; or the pointwise
    one over a ``MATRIX_LIMIT`` it exceeds): the same step."""
    if limit is not None:
        monkeypatch.setattr(jacobian_matrix, "MATRIX_LIMIT", limit)
    first, second = network(), network()
    jac = poisson_pointwise(first).jacobian(list(first.parameters()))
    before = torch.cat([p.detach().reshape(-1) for p in first.parameters()])
    settings = {**FULL_BATCH_DEFAULTS, "solver": "conjugate", "forward_mode": "auto",
                "precondition": precondition, "precondition_rank": 16}  # fmt: skip
    moves, engines = [], []
    for model, model_fn in ((first, lambda: poisson_batched(first)),
                            (second, poisson_pointwise(second))):  # fmt: skip
        opt = CurveBall(model, **settings)
        torch.manual_seed(0)  # the same sketch Ω
        opt.step(model_fn, half_squared_norm)
        engines.append(opt.last.engine)
        moves.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before)
    assert engines == ["forward", "jacobian" if limit is None else "forward"]
    torch.testing.assert_close(jac @ moves[0], jac @ moves[1], rtol=1e-7, atol=1e-12)


def test_the_sketch_from_the_jacobian_is_the_gauss_newton_matrix_times_omega(monkeypatch):
    """With ``J`` at hand, the Nyström sketch is ``Jᵀ H_L (J Ω)`` in two matrix products:
    for ½‖r‖² (``H_L = I``) the dense ``JᵀJ Ω``."""
    model = network()
    jac = poisson_pointwise(model).jacobian(list(model.parameters()))
    sketches, sketch = [], _products.sketch

    def recorded(*args, **kwargs):
        out = sketch(*args, **kwargs)
        sketches.append((out, kwargs.get("columns_product") is not None))
        return out

    monkeypatch.setattr(_products, "sketch", recorded, raising=True)
    settings = {**FULL_BATCH_DEFAULTS, "solver": "conjugate", "precondition": "nystrom",
                "precondition_rank": 8}  # fmt: skip
    opt = CurveBall(model, **settings)
    opt.step(poisson_pointwise(model), half_squared_norm)
    assert opt.last.engine == "jacobian"
    ((omega, images), batched), *_ = sketches
    assert batched and omega.shape == (jac.shape[1], 8)
    torch.testing.assert_close(images, jac.T @ (jac @ omega), rtol=1e-10, atol=1e-12)


def test_the_preset_sketches_every_step_at_rank_128_only_where_the_jacobian_is_at_hand(
    monkeypatch,
):
    """``precondition_interval`` and ``precondition_rank`` at ``"auto"`` (the preset's):
    with ``J`` at hand a new rank-128 sketch at every step, with products from passes a
    rank-64 one every ten steps (here on 161 parameters, so that both ranks are below D)."""
    shapes, sketch = [], _products.sketch

    def recorded(*args, **kwargs):
        out = sketch(*args, **kwargs)
        shapes.append(tuple(out[0].shape))
        return out

    monkeypatch.setattr(_products, "sketch", recorded, raising=True)
    settings = {**FULL_BATCH_DEFAULTS, "solver": "conjugate", "precondition": "nystrom"}
    assert settings["precondition_interval"] == settings["precondition_rank"] == "auto"
    for pointwise, expected in ((True, [(161, 128)] * 3), (False, [(161, 64)])):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 40), nn.Tanh(), nn.Linear(40, 1)).double()
        opt = CurveBall(model, **settings)
        shapes.clear()
        for _ in range(3):
            model_fn = poisson_pointwise(model) if pointwise else lambda m=model: poisson_batched(m)
            opt.step(model_fn, half_squared_norm)
        assert opt.last.engine == ("jacobian" if pointwise else "forward")
        assert shapes == expected
