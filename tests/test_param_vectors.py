"""Per-group inner products of parameter-shaped vectors, against a flat computation."""

from __future__ import annotations

import torch

from curveball._param_vectors import ParamLayout, dot


def test_group_dots_equal_flat_inner_products_per_group():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 2), (7,)]
    groups = [0, 1, 0, 1]
    a = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    b = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    layout = ParamLayout(a, groups, 2)
    dots = layout.group_dots([(a, b), (a, a)])
    for row, (u, v) in zip(dots, [(a, b), (a, a)], strict=True):
        for group in (0, 1):
            flat_u = torch.cat(
                [t.reshape(-1) for t, k in zip(u, groups, strict=True) if k == group]
            )
            flat_v = torch.cat(
                [t.reshape(-1) for t, k in zip(v, groups, strict=True) if k == group]
            )
            torch.testing.assert_close(row[group], flat_u @ flat_v, rtol=1e-14, atol=0)


def test_low_precision_dots_accumulate_in_float32_or_better():
    a = torch.full((4096,), 0.1, dtype=torch.bfloat16)
    exact = 4096 * float(a[0]) ** 2
    assert abs(float(dot(a, a)) - exact) / exact < 1e-5
