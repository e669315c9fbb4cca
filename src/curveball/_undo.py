"""Snapshots that let a step be undone or repeated: random generators and module buffers.

Every pass of one CurveBall iteration must see the same random draws (dropout
masks, stochastic depth, random data augmentation inside ``model_fn``);
otherwise ``J z``, ``Δz`` and ``J Δz`` would belong to different functions.
:class:`RngSnapshot` records the generators before the first pass so that each
extra pass can be rewound to it, and after it, so that a step finally consumes
exactly as much randomness as one ordinary forward pass. It covers PyTorch's CPU
and CUDA generators, Python's :mod:`random` and NumPy's global generator.

A step that fails or is skipped must leave the module's buffers (batch-norm
running statistics) as they were: :class:`BufferSnapshot` keeps copies of them,
and :func:`buffers_kept` protects the buffers of whatever modules run inside a
block when the optimizer does not know the module.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class RngSnapshot:
    """The state of the CPU, CUDA (of ``devices``), Python and NumPy generators."""

    def __init__(self, devices: Iterable[torch.device]) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda: dict[int, torch.Tensor] = {}
        for device in devices:
            if device.type == "cuda":
                index = device.index if device.index is not None else torch.cuda.current_device()
                if index not in self.cuda:
                    self.cuda[index] = torch.cuda.get_rng_state(index)
        self.python: Any = random.getstate()
        numpy = sys.modules.get("numpy")  # only if the program uses NumPy at all
        self.numpy: Any = numpy.random.get_state() if numpy is not None else None

    def restore(self) -> None:
        """Put every generator back to the recorded state."""
        torch.set_rng_state(self.cpu)
        for index, state in self.cuda.items():
            torch.cuda.set_rng_state(state, index)
        if self.python is not None:
            random.setstate(self.python)
        if self.numpy is not None:
            sys.modules["numpy"].random.set_state(self.numpy)

    def forget_unused(self, before: RngSnapshot) -> None:
        """Stop rewinding the Python and NumPy generators if nothing drew from them
        between ``before`` and this snapshot (then no repeat of that code will).

        Setting NumPy's state costs about as much as a small layer; most models
        never touch it, so this saves that cost on every later rewind.
        """
        if self.python == before.python:
            self.python = before.python = None
        if _same_numpy_state(self.numpy, before.numpy):
            self.numpy = before.numpy = None


def _same_numpy_state(a: Any, b: Any) -> bool:
    """Whether two ``numpy.random.get_state()`` tuples are equal (``None``: no NumPy)."""
    if a is None or b is None:
        return a is None and b is None
    return a[0] == b[0] and a[2:] == b[2:] and bool((a[1] == b[1]).all())


class BufferSnapshot:
    """Copies of some buffers, to put back after a failed or skipped step.

    Args:
        current: a callable returning the buffers now registered (user code may
            replace a buffer tensor, so they are looked up at each use).
    """

    def __init__(self, current: Any) -> None:
        self._current = current
        self._saved = [b.clone() for b in current()]

    def restore(self) -> None:
        if self._saved:
            torch._foreach_copy_(self._current(), self._saved)


@contextmanager
def buffers_kept() -> Iterator[None]:
    """Run a block and put back the buffers of every module that ran in it.

    A global forward pre-hook copies each module's buffers the first time the
    module runs; on exit they are copied back. This serves passes through a model
    that the optimizer only knows by its parameters.
    """
    saved: dict[int, tuple[nn.Module, list[tuple[str, torch.Tensor]]]] = {}

    def keep(module: nn.Module, _inputs: Sequence[Any]) -> None:
        if id(module) not in saved and module._buffers:
            copies = [(n, b.clone()) for n, b in module._buffers.items() if b is not None]
            saved[id(module)] = (module, copies)

    handle = nn.modules.module.register_module_forward_pre_hook(keep)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for module, copies in saved.values():
                for name, copy in copies:
                    module._buffers[name].copy_(copy)
