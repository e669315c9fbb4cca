"""Conformance: CurveBall on a zoo of models people use, against independent oracles.

For every family of :mod:`benchmarks.zoo` (float64, a few thousand parameters):
with the parameters frozen (``lr=0``) and λ fixed, ``z`` converges to the damped
Newton step ``−(G + λI)⁻¹ g`` computed from dense ``torch.func`` matrices (and
``G`` agrees with curvlinops' independent GGN products); the step runs in
forward mode wherever PyTorch has the formulas; and 20 training steps reduce
the loss.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import ZOO, flat_state, zoo_cross_entropy

from benchmarks.oracles import dense_problem, flat_params, stateless_copy
from benchmarks.zoo import available
from curveball import CurveBall

NEWTON_STEPS = 200
LAMBDA = 1.0


def family_or_skip(name: str):
    family = ZOO[name]
    if not available(family):
        pytest.skip(f"{name} needs the optional package {family.needs!r}")
    return family


@pytest.mark.parametrize("name", sorted(ZOO))
def test_z_converges_to_the_damped_newton_step_on_the_expected_engine(name):
    family = family_or_skip(name)
    model, inputs, targets = family.make()
    loss_fn = zoo_cross_entropy(targets)
    opt = CurveBall(model, lr=0.0, lambd=LAMBDA, auto_lambda=False, precondition=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's, where expected
        for _ in range(NEWTON_STEPS):
            opt.step(family.model_fn(model, inputs), loss_fn)
    assert opt.last.engine == ("forward" if family.forward_mode else "double-backward")
    dense = dense_problem(family.traceable(model), inputs, loss_fn, family.predict)
    system = dense["G"] + LAMBDA * torch.eye(dense["w"].numel(), dtype=torch.float64)
    newton = -torch.linalg.solve(system, dense["g"])
    error = (flat_state(opt, model) - newton).norm() / newton.norm()
    assert error <= 1e-8


@pytest.mark.parametrize("name", sorted(ZOO))
def test_twenty_steps_reduce_the_loss(name):
    family = family_or_skip(name)
    model, inputs, targets = family.make(seed=1, dtype=torch.float32)
    loss_fn = zoo_cross_entropy(targets)
    opt = CurveBall(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        losses = [opt.step(family.model_fn(model, inputs), loss_fn)[0].item() for _ in range(20)]
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["mlp", "cnn + batch norm", "lstm language model"])
def test_the_dense_oracle_agrees_with_curvlinops(name):
    curvlinops = pytest.importorskip("curvlinops")
    family = ZOO[name]
    model, inputs, targets = family.make()
    loss_fn = zoo_cross_entropy(targets)
    dense = dense_problem(model, inputs, loss_fn, family.predict)

    clone = stateless_copy(model)  # curvlinops' torch.func passes cannot update statistics

    class Predict(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = clone

        def forward(self, x):
            return family.predict(self.model, (x,))

    params = [p for p in clone.parameters() if p.requires_grad]
    ggn = curvlinops.GGNLinearOperator(
        Predict(), torch.nn.CrossEntropyLoss(), params, [(inputs[0], targets)]
    )
    v = torch.randn(dense["w"].numel(), dtype=torch.float64)
    torch.testing.assert_close(ggn @ v, dense["G"] @ v, rtol=1e-9, atol=1e-11)
    assert flat_params(model).numel() == dense["w"].numel()
