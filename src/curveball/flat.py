"""Vectors of the parameter space stored flat.

CurveBall keeps one extra vector per parameter (the running estimate ``z``) and
forms a few inner products of such vectors every step. Keeping each vector as
one contiguous tensor per (device, dtype) makes every inner product and every
update a single kernel, and gives the distributed all-reduce a ready-made
flattened bucket. The per-parameter tensors are views into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class _Bucket:
    device: torch.device
    dtype: torch.dtype
    indices: list[int] = field(default_factory=list)  # parameter indices, grouped by group
    offsets: list[int] = field(default_factory=list)
    numel: int = 0
    # (group index, start, end): contiguous runs of one parameter group
    segments: list[tuple[int, int, int]] = field(default_factory=list)


class FlatSpace:
    """The layout of a list of parameters as flat vectors.

    Args:
        params: the parameters, in the optimizer's order.
        groups: for each parameter, the index of its parameter group.
    """

    def __init__(self, params: Sequence[torch.Tensor], groups: Sequence[int]) -> None:
        self.shapes = [p.shape for p in params]
        self.num_groups = max(groups) + 1 if groups else 0
        buckets: dict[tuple[torch.device, torch.dtype], _Bucket] = {}
        order = sorted(range(len(params)), key=lambda i: groups[i])
        for i in order:
            p = params[i]
            bucket = buckets.setdefault((p.device, p.dtype), _Bucket(p.device, p.dtype))
            if not bucket.segments or bucket.segments[-1][0] != groups[i]:
                bucket.segments.append((groups[i], bucket.numel, bucket.numel))
            bucket.indices.append(i)
            bucket.offsets.append(bucket.numel)
            bucket.numel += p.numel()
            group, start, _ = bucket.segments[-1]
            bucket.segments[-1] = (group, start, bucket.numel)
        self.buckets = list(buckets.values())

    def zeros(self) -> list[torch.Tensor]:
        """A zero vector, one flat tensor per bucket."""
        return [torch.zeros(b.numel, device=b.device, dtype=b.dtype) for b in self.buckets]

    def views(self, flats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-parameter views (in parameter order) into the flat tensors."""
        out: list[torch.Tensor | None] = [None] * len(self.shapes)
        for bucket, flat in zip(self.buckets, flats, strict=True):
            for i, offset in zip(bucket.indices, bucket.offsets, strict=True):
                shape = self.shapes[i]
                out[i] = flat[offset : offset + shape.numel()].view(shape)
        return out  # type: ignore[return-value]

    def flatten(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Concatenate per-parameter tensors into new flat tensors (one copy)."""
        return [
            torch.cat([tensors[i].reshape(-1) for i in bucket.indices]) for bucket in self.buckets
        ]

    def group_dots(
        self, pairs: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]]
    ) -> torch.Tensor:
        """Inner products per parameter group, for several pairs of flat vectors.

        Returns a tensor of shape ``(len(pairs), num_groups)`` in float32 or
        better (low-precision parameters are accumulated in float32), on the
        device of the first bucket.
        """
        device = self.buckets[0].device
        dtype = torch.promote_types(self.buckets[0].dtype, torch.float32)
        rows = []
        for a, b in pairs:
            per_group: list[torch.Tensor | int] = [0] * self.num_groups
            for bucket, x, y in zip(self.buckets, a, b, strict=True):
                for group, start, end in bucket.segments:
                    xs, ys = x[start:end], y[start:end]
                    if bucket.dtype in _LOW_PRECISION:
                        xs, ys = xs.float(), ys.float()
                    dot = torch.dot(xs, ys).to(device=device, dtype=dtype)
                    per_group[group] = per_group[group] + dot
            rows.append(
                torch.stack([torch.as_tensor(v, device=device, dtype=dtype) for v in per_group])
            )
        return torch.stack(rows)
