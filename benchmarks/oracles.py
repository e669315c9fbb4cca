"""Independent dense oracles (torch.func): Jacobians, loss Hessians and the GGN matrix.

Used by the test suite and the conformance benchmark; nothing here uses the library.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev


def stateless_copy(model: nn.Module) -> nn.Module:
    """A copy whose batch-norm layers use batch statistics without keeping running ones.

    In training mode this computes the same function as ``model`` but mutates no
    buffer, which ``torch.func`` transforms require.
    """
    clone = copy.deepcopy(model)
    for module in clone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None
    return clone


@contextlib.contextmanager
def _parameters_replaced(module: nn.Module, tensors: dict):
    """``torch.func.functional_call``'s substitution, for a prediction function of the module."""
    with torch.nn.utils.stateless._reparametrize_module(module, tensors, tie_weights=True):
        yield


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def dense_problem(model: nn.Module, inputs, loss_fn, prediction=None):
    """Dense ``J`` (outputs × parameters), ``H_L``, ``J_L``, ``g`` and ``G = Jᵀ H_L J``.

    ``prediction(module, inputs)`` gives the predictions (default: ``module(inputs)``).
    """
    clone = stateless_copy(model)
    named = [(n, p) for n, p in clone.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]

    def predict(w: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(w, sizes)
        tensors = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        if prediction is None:
            return functional_call(clone, tensors, (inputs,))
        with _parameters_replaced(clone, tensors):
            return prediction(clone, inputs)

    w = flat_params(clone)
    y = predict(w).detach()
    jac = jacrev(predict)(w).reshape(y.numel(), w.numel())
    h_loss = hessian(lambda out: loss_fn(out))(y).reshape(y.numel(), y.numel())
    j_loss = torch.func.grad(lambda out: loss_fn(out))(y).reshape(-1)
    ggn = jac.T @ h_loss @ jac
    grad = jac.T @ j_loss
    return {"J": jac, "H": h_loss, "J_L": j_loss, "G": ggn, "g": grad, "y": y, "w": w}
