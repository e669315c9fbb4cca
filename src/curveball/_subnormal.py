"""Keeping the optimizer's state out of the subnormal range, where CPUs slow down.

Along a direction in which the gradient vanishes batch after batch (the weights of
a ReLU unit that has stopped firing, of an input pixel that few images touch), ``J``
maps the tangent to zero and the model's gradient is ``Δz = λ z``: the update
``z ← ρ z − β P λ z`` (Henriques et al., ICCV 2019, eq. 8) then shrinks that entry of
``z`` geometrically, by a constant factor per step, all the way down through the
subnormal numbers to zero. On x86 CPUs without flush-to-zero, arithmetic with
subnormal operands runs in microcode, many times slower than on normal numbers, and every
forward-mode pass multiplies ``z`` (or ``d = P Δz``, a multiple of it along such a
direction) into the activations. ``python -m benchmarks.subnormal`` measures what
that costs a 784-512-512-10 ReLU network's step, with the sweep below and without.

Every :data:`INTERVAL` steps the entries that no longer mean anything are set to
zero, which is what a flush-to-zero CPU does to them anyway:

* ``z`` below ``√tiny`` of its dtype (1.1e-19 in float32 and bfloat16, 1.5e-154 in
  float64): with that margin, ``d`` and the products of either with an activation
  of magnitude above ``√tiny`` stay normal. A step of ``z`` that small moves no
  parameter larger than about 1e-12 in float32.
* the preconditioner's average ``v`` below ``(ε u / 4)²`` (``u`` the dtype's
  machine epsilon): then ``√v`` is below half a unit in the last place of ``ε``,
  so the denominator ``√v + ε`` is ``ε`` whether ``v`` is zeroed or not. For an
  ``ε`` under 6e-11 in float32 that floor is under ``2⁸ tiny``, and ``2⁸ tiny`` is
  used instead (``v`` shrinks by at most the decay γ per step, so a floor that far
  above ``tiny`` catches it before it turns subnormal for any γ ≥ 1/2).

An entry decaying by a factor ``r`` per step takes ``ln(√tiny / tiny) / ln(1/r)``
steps, about 44 / ln(1/r), from ``√tiny`` to ``tiny``: every entry with
``r ≥ e^(−44/8) ≈ 0.004`` is therefore zeroed before it turns subnormal. A faster
one passes the whole subnormal range (a factor of 8·10⁶) within three steps. The
sweep costs three element-wise passes over ``z`` (about 0.5 ms for 670,000
parameters on 2 CPU cores), so once every eight steps. float16 state is left
alone: its arithmetic runs in float32, where its subnormals are normal numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from curveball._param_vectors import real_view

INTERVAL = 8
"""Steps between two sweeps (see the module docstring for why eight)."""


def due(step: int) -> bool:
    """Whether step number ``step`` (counted from 1) ends with a sweep."""
    return step % INTERVAL == 0


def _floor_z(dtype: torch.dtype) -> float | None:
    if dtype == torch.float16:
        return None
    return torch.finfo(dtype).tiny ** 0.5


def _floor_average(dtype: torch.dtype, eps: float) -> float | None:
    if dtype == torch.float16:
        return None
    info = torch.finfo(dtype)
    return max((eps * info.eps / 4) ** 2, 2.0**8 * info.tiny)


def _zero_below_(tensors: Sequence[torch.Tensor], floors: Sequence[float | None]) -> None:
    for t, floor in zip(tensors, floors, strict=True):
        if floor is not None and t.numel():
            t = real_view(t)
            t.masked_fill_(t.abs() < floor, 0.0)


@torch.no_grad()
def sweep_(
    zs: Sequence[torch.Tensor],
    averages: Sequence[torch.Tensor] | None = None,
    eps: float | None = None,
) -> None:
    """Zero the entries of ``z`` below ``√tiny`` and, with ``averages`` and the
    preconditioner's ``eps``, those of ``v`` that cannot change ``√v + ε``, in place."""
    _zero_below_(zs, [_floor_z(real_view(z).dtype) for z in zs])
    if averages is not None:
        assert eps is not None
        _zero_below_(averages, [_floor_average(real_view(v).dtype, eps) for v in averages])
