"""The Nyström preconditioner: exact on a matrix of its rank, a spectrum-flattening one below."""

from __future__ import annotations

import torch
from cases import flat_state, tiny_problem

from benchmarks.oracles import dense_problem
from curveball import CurveBall
from curveball._nystrom import NystromInverse, sketch


def low_rank(size: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(size, rank, generator=g, dtype=torch.float64)
    return a @ a.T


def as_product(matrix: torch.Tensor):
    return lambda v: [(matrix @ v[0].reshape(-1)).reshape(v[0].shape)]


def test_a_sketch_as_large_as_the_rank_inverts_the_damped_matrix_up_to_scale():
    matrix = low_rank(12, 4)
    like = [torch.zeros(3, 4, dtype=torch.float64)]
    omega, images = sketch(
        as_product(matrix), like, rank=6, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(images, matrix @ omega, rtol=1e-12, atol=1e-12)
    inverse = NystromInverse(omega, images)
    damping = 0.1
    v = [torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))]
    got = inverse.apply(v, damping)[0].reshape(-1)
    exact = torch.linalg.solve(
        matrix + damping * torch.eye(12, dtype=torch.float64), v[0].reshape(-1)
    )
    smallest = float(inverse.values[-1])  # 0: the sketch is larger than the rank
    torch.testing.assert_close(got, (smallest + damping) * exact, rtol=1e-8, atol=1e-10)


def test_below_the_rank_the_preconditioned_spectrum_is_flatter():
    """A fast-decaying spectrum (as Gauss-Newton matrices of PINNs have): a rank-10 sketch of
    a 40 × 40 matrix takes the damped system's condition number from 1e3 to about 10."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64)).Q
    matrix = basis @ torch.diag(torch.logspace(0, -8, 40, dtype=torch.float64)) @ basis.T
    damped = matrix + 1e-3 * torch.eye(40, dtype=torch.float64)
    like = [torch.zeros(40, dtype=torch.float64)]
    omega, images = sketch(as_product(matrix), like, rank=10, generator=g)
    inverse = NystromInverse(omega, images)
    columns = [inverse.apply([column], 1e-3)[0] for column in torch.eye(40, dtype=torch.float64)]
    values = torch.linalg.eigvals(torch.stack(columns, dim=1) @ damped).real
    before = torch.linalg.eigvalsh(damped)
    assert float(before.max() / before.min()) > 900
    assert float(values.max() / values.min()) < 50


def test_conjugate_iterations_with_the_sketch_reach_the_damped_newton_step():
    model, x, loss_fn = tiny_problem(batch=20)
    n = sum(p.numel() for p in model.parameters())
    opt = CurveBall(model, lr=0.0, lambd=0.3, auto_lambda=False, precondition="nystrom",
                    precondition_rank=16, inner_steps=n, solver="conjugate")  # fmt: skip
    opt.step(lambda: model(x), loss_fn)
    dense = dense_problem(model, x, loss_fn)
    newton = -torch.linalg.solve(dense["G"] + 0.3 * torch.eye(n, dtype=torch.float64), dense["g"])
    assert (flat_state(opt, model) - newton).norm() <= 1e-8 * newton.norm()
