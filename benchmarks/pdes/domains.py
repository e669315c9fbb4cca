"""Collocation points on the unit cube [0, 1]ᵈ and on its boundary, drawn uniformly.

Points are drawn on the CPU from a ``torch.Generator`` (so that a seed fixes them on every
device) in float64, then moved to the requested device and dtype.
"""

from __future__ import annotations

import torch


def uniform_cube(
    n: int, dim: int, generator: torch.Generator, like: torch.Tensor | None = None
) -> torch.Tensor:
    """``n`` points drawn uniformly from [0, 1]ᵈ, shape ``(n, d)`` (on ``like``'s device and
    in its dtype when given)."""
    x = torch.rand(n, dim, generator=generator, dtype=torch.float64)
    return x if like is None else x.to(like)


def cube_boundary(
    n: int, dim: int, generator: torch.Generator, like: torch.Tensor | None = None
) -> torch.Tensor:
    """``n`` points drawn uniformly from the boundary ∂[0, 1]ᵈ: a face chosen uniformly among
    the 2d faces (all of equal area), then a uniform point on it (its coordinate across the
    face set to 0 or 1). In 2d: uniform on the four edges."""
    x = torch.rand(n, dim, generator=generator, dtype=torch.float64)
    axis = torch.randint(dim, (n,), generator=generator)
    side = torch.randint(2, (n,), generator=generator).to(torch.float64)
    x[torch.arange(n), axis] = side
    return x if like is None else x.to(like)
