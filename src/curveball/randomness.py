"""Snapshots of the random number generators.

Every pass of one CurveBall iteration must see the same random draws (dropout
masks, stochastic depth, random data augmentation inside ``model_fn``);
otherwise ``J z``, ``Δz`` and ``J Δz`` would belong to different functions.
The optimizer takes a snapshot before the first pass, rewinds to it before each
extra pass, and finally leaves the generators where the first pass left them,
so that a CurveBall step consumes exactly as much randomness as one ordinary
forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class RngSnapshot:
    """The state of the CPU generator and of the CUDA generators of ``devices``."""

    def __init__(self, devices: Iterable[torch.device]) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda: dict[int, torch.Tensor] = {}
        for device in devices:
            if device.type == "cuda":
                index = device.index if device.index is not None else torch.cuda.current_device()
                if index not in self.cuda:
                    self.cuda[index] = torch.cuda.get_rng_state(index)

    def restore(self) -> None:
        """Put every generator back to the recorded state."""
        torch.set_rng_state(self.cpu)
        for index, state in self.cuda.items():
            torch.cuda.set_rng_state(state, index)
