"""The trainable parameters of a step, where they live, and the per-parameter buffers.

A :class:`Layout` is rebuilt whenever the set of trainable parameters changes
(``requires_grad`` toggled, a group added): the parameters in the optimizer's
order, their groups, the inner-product layout, where they live in the module,
the Jacobian engines, and the tensors of ``optimizer.state`` that a step reads
and writes (``z``, the preconditioner's average) together with scratch buffers
that are kept between steps instead of allocated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from curveball._curvature.engine_choice import EngineChoice
from curveball._curvature.module_tensors import ModuleTensors
from curveball._param_vectors import ParamLayout
from curveball._preconditioner import Workspace, square_average_like, workspace_like

AVERAGE = "dz_square_average"
"""The preconditioner's state key (float32 for half-precision parameters)."""


@dataclass
class Layout:
    """The trainable parameters, their groups and the engines (see the module docstring)."""

    key: tuple[int, ...]
    params: list[torch.Tensor]
    members: list[list[int]]  # per group, the indices of its trainable parameters
    vectors: ParamLayout
    tensors: ModuleTensors | None
    engines: EngineChoice
    zs: list[torch.Tensor] | None = None
    averages: list[torch.Tensor] | None = None  # the preconditioner's v, if it is on
    workspace: Workspace | None = None  # the preconditioner's buffers, if it is on
    kept: list[torch.Tensor] | None = None  # z and w before a trial commit, if kept in buffers
    whole_batch_jvp: bool = False  # the curvature mini-batch failed on this model: not retried
    curvature_inverse: Any = None  # the dense or Nyström preconditioner (see _products)

    def in_group(self, index: int, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The members of parameter group ``index`` among per-parameter ``tensors``."""
        return [tensors[i] for i in self.members[index]]


def trainable(groups: Sequence[dict[str, Any]]) -> tuple[list[torch.Tensor], list[int]]:
    """The parameters with ``requires_grad`` and the index of each one's group."""
    params, owners = [], []
    for index, group in enumerate(groups):
        for p in group["params"]:
            if p.requires_grad:
                params.append(p)
                owners.append(index)
    if not params:
        raise ValueError("params: no trainable parameters (none has requires_grad=True)")
    return params, owners


def build(
    groups: Sequence[dict[str, Any]],
    model: nn.Module | None,
    forward_mode: str,
    on_fallback: Callable[[str], None],
    previous: Layout | None,
) -> Layout:
    """``previous`` if the trainable set is unchanged, else a new layout for it."""
    params, owners = trainable(groups)
    key = tuple(id(p) for p in params)
    if previous is not None and previous.key == key:
        return previous
    tensors = ModuleTensors(model, params) if model is not None else None
    mode = "double-backward" if tensors is None else forward_mode
    return Layout(
        key=key,
        params=params,
        members=[[i for i, g in enumerate(owners) if g == index] for index in range(len(groups))],
        vectors=ParamLayout(params, owners, len(groups)),
        tensors=tensors,
        engines=EngineChoice(params, tensors, mode, on_fallback),
    )


def state_tensor(state: dict, p: torch.Tensor, key: str, fresh: torch.Tensor) -> torch.Tensor:
    """``state[key]`` of parameter ``p``: ``fresh`` (zeros) if absent, else the saved values
    in ``fresh``'s layout, dtype and device when they differ."""
    saved = state.get(key)
    if saved is None:
        saved = fresh
    elif not isinstance(saved, torch.Tensor) or saved.shape != p.shape:
        got = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
        raise ValueError(
            f"state_dict: {key} of a parameter of shape {tuple(p.shape)} has shape {got}"
        )
    elif (saved.stride(), saved.dtype, saved.device) != (
        fresh.stride(),
        fresh.dtype,
        fresh.device,
    ):
        saved = fresh.copy_(saved)
    state[key] = saved
    return saved


def attach_state(layout: Layout, state: dict, precondition: bool) -> None:
    """Bind ``z`` (and, if the preconditioner is on, its average) of ``optimizer.state``."""
    params = layout.params
    if layout.zs is None:
        # z must be laid out like its parameter: it is the tangent of forward mode
        layout.zs = [
            state_tensor(state[p], p, "z", torch.zeros_like(p, memory_format=torch.preserve_format))
            for p in params
        ]
    if layout.averages is None and precondition:
        layout.averages = [
            state_tensor(state[p], p, AVERAGE, square_average_like(p)) for p in params
        ]
        if keeps_buffers(params):
            layout.workspace = workspace_like(layout.averages)


def adopt_averages(layout: Layout, state: dict, updated: list[torch.Tensor]) -> None:
    """Make ``v'`` the preconditioner's average: it and the old ``v`` trade places (the
    old buffers receive the next step's ``v'``) instead of being copied."""
    previous = layout.averages
    assert previous is not None
    layout.averages = updated
    for p, v in zip(layout.params, updated, strict=True):
        state[p][AVERAGE] = v
    if layout.workspace is not None:
        layout.workspace = (previous, layout.workspace[1])


def keeps_buffers(params: Sequence[torch.Tensor]) -> bool:
    """Whether parameter-sized scratch tensors are kept between steps instead of allocated.

    On a CPU, passes over freshly allocated parameter-sized tensors cost several times
    more than over kept ones; CUDA's caching allocator makes allocation free, and there
    memory is the scarcer resource.
    """
    return all(p.device.type == "cpu" for p in params)
