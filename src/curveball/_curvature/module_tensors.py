"""Temporarily substitute a module's parameters and buffers by other tensors.

Forward-mode passes need the module to compute with *dual* tensors (a primal
value plus a tangent) in place of its parameters, and the extra passes of a
CurveBall step must not mutate the module's real buffers (batch-norm running
statistics). :class:`ModuleTensors` records where every trainable parameter and
every buffer lives inside the module tree so that both can be swapped in and
out cheaply, without copying any data (recurrent layers, which read their
weights from a list of their own, get that list swapped too).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

Slot = tuple[nn.Module, str]


class ModuleTensors:
    """Where a module keeps its parameters and buffers.

    Args:
        module: the model.
        params: the trainable parameters to substitute, in the optimizer's order.
            Every one of them must be registered somewhere in ``module``.
    """

    def __init__(self, module: nn.Module, params: Sequence[torch.Tensor]) -> None:
        self.module = module
        index = {id(p): i for i, p in enumerate(params)}
        self.param_slots: list[list[Slot]] = [[] for _ in params]
        self.buffer_slots: list[Slot] = []
        self.buffers: list[torch.Tensor] = []
        for sub in module.modules():
            for name, p in sub._parameters.items():
                if p is not None and id(p) in index:
                    self.param_slots[index[id(p)]].append((sub, name))
            for name, b in sub._buffers.items():
                if b is not None:
                    self.buffer_slots.append((sub, name))
                    self.buffers.append(b)
        missing = [i for i, slots in enumerate(self.param_slots) if not slots]
        if missing:
            raise ValueError(
                f"model: {len(missing)} optimized parameter(s) (e.g. index {missing[0]}) are not "
                "registered in the given nn.Module; pass the module that owns all of them"
            )

    def current_buffers(self) -> list[torch.Tensor]:
        """The buffer tensors currently registered (they may be replaced by user code)."""
        return [sub._buffers[name] for sub, name in self.buffer_slots]

    @contextmanager
    def substituted(
        self,
        params: Sequence[torch.Tensor] | None = None,
        buffers: Sequence[torch.Tensor] | None = None,
    ) -> Iterator[None]:
        """Run the body with ``params`` and/or ``buffers`` in place of the module's own."""
        saved: list[tuple[Any, Any, torch.Tensor]] = []
        try:
            if params is not None:
                for slots, tensor in zip(self.param_slots, params, strict=True):
                    for sub, name in slots:
                        saved.append((sub._parameters, name, sub._parameters[name]))
                        sub._parameters[name] = tensor
                        flat = _flat_weight_index(sub, name)
                        if flat is not None:  # recurrent layers keep their own list too
                            saved.append((sub._flat_weights, flat, sub._flat_weights[flat]))
                            sub._flat_weights[flat] = tensor
            if buffers is not None:
                for (sub, name), tensor in zip(self.buffer_slots, buffers, strict=True):
                    saved.append((sub._buffers, name, sub._buffers[name]))
                    sub._buffers[name] = tensor
            yield
        finally:
            for store, name, tensor in reversed(saved):
                store[name] = tensor


def _flat_weight_index(module: nn.Module, name: str) -> int | None:
    """Where ``nn.RNNBase`` keeps parameter ``name`` in ``_flat_weights``, which its
    forward reads instead of the registered parameters."""
    names = getattr(module, "_flat_weights_names", None)
    if names is None or name not in names or not hasattr(module, "_flat_weights"):
        return None
    return names.index(name)
