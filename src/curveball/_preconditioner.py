"""A diagonal preconditioner for the update of ``z`` (an option; off in the paper's method).

CurveBall improves its estimate ``z`` of the Newton step by one gradient step on
the quadratic model per iteration, ``z' = ρ z − β Δz`` with
``Δz = (G + λI) z + g`` the model's gradient. A plain gradient step converges
slowly along directions whose curvature is small compared with the largest one,
and with a small damping λ the curvature of a network spans many scales. With
``precondition=True`` the step is taken along

    d = P Δz,   P = diag(1 / (√v + ε)),   v ← γ v + (1 − γ) Δz²

instead: the second-moment scaling of RMSProp and Adam (Kingma and Ba, ICLR
2015), applied to the inner solver rather than to the parameters. Everything
else is unchanged: ρ and β are still the exact minimiser of the model over
``span{z, d}`` (so the overall scale of ``P`` does not matter and ``v`` needs no
bias correction), and since ``P`` is positive definite, ``d = 0`` exactly when
``Δz = 0``: the fixed point is still ``z = −(G + λI)⁻¹ g``.

``v`` is kept in float32 at least (saturating at the largest finite value,
for losses near float32's range), and it only changes when a step is
committed: a skipped step leaves it as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from curveball._param_vectors import HALF_PRECISION, real_view


def average_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype of parameter ``p``'s moving average: float32 for half precision (a
    complex parameter's average is complex: the averages of its real and its imaginary
    parts' squares)."""
    return torch.float32 if p.dtype in HALF_PRECISION else p.dtype


def square_average_like(p: torch.Tensor) -> torch.Tensor:
    """A zero moving average of ``Δz²`` for parameter ``p``."""
    return torch.zeros_like(p, dtype=average_dtype(p), memory_format=torch.preserve_format)


Workspace = tuple[list[torch.Tensor], list[torch.Tensor]]
"""Two buffers shaped like the averages: for ``v'`` and for ``√v' + ε``."""


def workspace_like(averages: Sequence[torch.Tensor]) -> Workspace:
    """Buffers that :func:`precondition_` fills at every step instead of allocating."""
    return (
        [torch.empty_like(v, memory_format=torch.preserve_format) for v in averages],
        [torch.empty_like(v, memory_format=torch.preserve_format) for v in averages],
    )


def precondition_(
    dz: Sequence[torch.Tensor],
    averages: Sequence[torch.Tensor],
    decay: float,
    eps: float,
    workspace: Workspace | None = None,
) -> Workspace:
    """Turn ``Δz`` into ``d = Δz / (√v' + ε)`` in place and return ``v'`` and ``√v' + ε``.

    Args:
        dz: ``Δz``, one tensor per parameter; overwritten with ``d``.
        averages: the current ``v`` (left unchanged).
        decay: γ in ``v' = γ v + (1 − γ) Δz²``.
        eps: ε, added to ``√v'``.
        workspace: from :func:`workspace_like`; ``v'`` and ``√v' + ε`` are its lists. Without it,
            new tensors are allocated (element-wise passes over freshly allocated
            parameter-sized tensors cost several times more on a CPU).
    """
    updated, denominators = workspace if workspace is not None else workspace_like(averages)
    _moments(dz, averages, updated, denominators, decay, eps)
    divide_(dz, denominators)
    return updated, denominators


def _moments(dz, averages, updated, denominators, decay: float, eps: float) -> None:
    """``v' = γ v + (1 − γ) Δz²`` and ``√v' + ε`` into ``updated`` and ``denominators``."""
    dz, averages = [real_view(t) for t in dz], [real_view(t) for t in averages]
    updated, denominators = [real_view(t) for t in updated], [real_view(t) for t in denominators]
    wide = [d.float() if d.dtype in HALF_PRECISION else d for d in dz]
    for new, old in zip(updated, averages, strict=True):  # out=: one pass, not copy and scale
        torch.mul(old, decay, out=new)
    torch._foreach_addcmul_(updated, wide, wide, value=1.0 - decay)
    # Δz² overflows float32 beyond |Δz| ≈ 1.8e19 (a loss near 1e20): v then saturates at the
    # largest finite value, so d stays finite and the step still descends
    for dtype in {t.dtype for t in updated}:
        same = [t for t in updated if t.dtype == dtype]
        torch._foreach_clamp_max_(same, torch.finfo(dtype).max)
    for root, new in zip(denominators, updated, strict=True):
        torch.sqrt(new, out=root)
    torch._foreach_add_(denominators, eps)


def divide_(dz: Sequence[torch.Tensor], denominators: Sequence[torch.Tensor]) -> None:
    """``d = Δz / (√v' + ε)`` in place (element-wise on the pairs of complex parameters)."""
    dz, denominators = [real_view(t) for t in dz], [real_view(t) for t in denominators]
    if all(d.dtype not in HALF_PRECISION for d in dz):
        torch._foreach_div_(list(dz), denominators)
    else:
        for d, denominator in zip(dz, denominators, strict=True):
            d.copy_((d.float() if d.dtype in HALF_PRECISION else d) / denominator)


def multiplied(d: Sequence[torch.Tensor], denominators: Sequence[torch.Tensor]):
    """``Δz = d · (√v' + ε)``: ``Δz`` back from the direction, as new tensors."""
    out = []
    for x, denominator in zip(d, denominators, strict=True):
        denominator = real_view(denominator)
        product = real_view(x).to(denominator.dtype) * denominator
        out.append(torch.view_as_complex(product) if x.is_complex() else product)
    return out
