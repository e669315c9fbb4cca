"""Vectors of the parameter space, stored as one tensor per parameter.

CurveBall keeps one extra vector per parameter (the running estimate ``z``,
like SGD's momentum buffer) and forms a few inner products of such vectors
every step. Each vector is kept as a list of tensors shaped and strided like
the parameters: forward-mode AD then takes ``z`` and ``Δz`` as tangents without
copying them (a tangent must have its parameter's memory layout), and the
back-propagated ``Jᵀ u`` arrives in exactly that form. :class:`ParamLayout`
forms the per-group inner products of such lists and averages them over
processes through one flattened buffer per (device, dtype). A complex parameter is
its (real, imaginary) pair throughout (:func:`real_view`): inner products are
``Re⟨a, b⟩``, as ``torch.optim`` treats complex parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from curveball._distributed import Averager

HALF_PRECISION = (torch.float16, torch.bfloat16)
"""Dtypes whose arithmetic CurveBall carries out in float32."""


def real_view(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its (real, imaginary) pairs (``torch.view_as_real``); a real
    one as it is. The parameter space of a complex parameter is that of its pairs, as in
    ``torch.optim``."""
    return torch.view_as_real(t) if t.is_complex() else t


def dot(a: torch.Tensor, b: torch.Tensor, precise: bool = False) -> torch.Tensor:
    """Inner product of two same-shaped tensors, accumulated in float32 or better
    (in float64 if ``precise``); for complex tensors the real one, ``Re⟨a, b⟩``, of their
    pairs."""
    a, b = real_view(a), real_view(b)
    if precise and a.dtype != torch.float64:
        a, b = a.double(), b.double()
    elif a.dtype in HALF_PRECISION or a.dtype != b.dtype:
        a, b = a.float(), b.float()
    return torch.dot(a.reshape(-1), b.reshape(-1))


class ParamLayout:
    """The parameters' layout: their parameter groups, devices and dtypes.

    Args:
        params: the parameters, in the optimizer's order.
        groups: for each parameter, the index of its parameter group.
        num_groups: the number of parameter groups.
    """

    def __init__(
        self, params: Sequence[torch.Tensor], groups: Sequence[int], num_groups: int
    ) -> None:
        self.num_groups = num_groups
        self.device = params[0].device
        self._single_device = all(p.device == self.device for p in params)
        self._single_dtype = len({p.dtype for p in params}) == 1
        dtype = params[0].dtype
        # one device and one real dtype of float32 or wider: every ``dot`` is a bare torch.dot
        plain = self._single_device and self._single_dtype and dtype.is_floating_point
        self._plain_dtype = dtype if plain and dtype not in HALF_PRECISION else None
        membership = torch.zeros(len(params), num_groups, dtype=torch.float64)
        membership[torch.arange(len(params)), torch.as_tensor(list(groups))] = 1.0
        self._membership = membership.to(self.device)
        buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            buckets.setdefault((p.device, p.dtype), []).append(i)
        self._buckets = list(buckets.values())

    def group_dots(
        self,
        pairs: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]],
        precise: bool = False,
    ) -> torch.Tensor:
        """Inner products per parameter group for several pairs of vectors.

        Returns a float64 tensor of shape ``(len(pairs), num_groups)`` on the
        first parameter's device (per-parameter products are accumulated in the
        parameters' precision, float32 at least, or in float64 if ``precise``).
        """
        if self._plain_dtype is not None and (not precise or self._plain_dtype == torch.float64):
            # what ``dot`` does for such tensors, without its per-tensor checks
            dots = [
                torch.dot(x.reshape(-1), y.reshape(-1))
                for a, b in pairs
                for x, y in zip(a, b, strict=True)
            ]
            table = torch.stack(dots).view(len(pairs), -1)
            return table.to(torch.float64) @ self._membership
        rows = []
        for a, b in pairs:
            dots = [dot(x, y, precise) for x, y in zip(a, b, strict=True)]
            if not (self._single_device and self._single_dtype):
                dots = [d.to(device=self.device, dtype=torch.float64) for d in dots]
            rows.append(torch.stack(dots))
        return torch.stack(rows).to(torch.float64) @ self._membership

    def mean_(self, vector: Sequence[torch.Tensor], averager: Averager) -> None:
        """Average ``vector`` in place over the processes: one all-reduce per bucket."""
        if averager.world_size == 1:
            return
        for indices in self._buckets:
            parts = [real_view(vector[i]) for i in indices]
            flat = torch.cat([t.reshape(-1) for t in parts])
            averager.mean_([flat])
            pieces = torch.split(flat, [t.numel() for t in parts])
            shaped = [x.view(t.shape) for x, t in zip(pieces, parts, strict=True)]
            torch._foreach_copy_(parts, shaped)
