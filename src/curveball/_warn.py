"""Warnings that point at the user's line and are given once per kind."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

_OWN = str(Path(__file__).resolve().parent)
_TORCH_OPTIM = str(Path(torch.optim.__file__).resolve().parent)


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside this package and torch.optim."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith((_OWN, _TORCH_OPTIM)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


class OnceWarner:
    """Gives each kind of warning once; the details of every occurrence go elsewhere."""

    def __init__(self) -> None:
        self.given: set[str] = set()

    def __call__(self, kind: str, message: str) -> None:
        if kind not in self.given:
            self.given.add(kind)
            warn(message + " (this warning is given once; see optimizer.last for each step)")
