"""Per-group inner products of parameter-shaped vectors, against a flat computation."""

from __future__ import annotations

import pytest
import torch

from curveball._param_vectors import ParamLayout, dot, real_view

DTYPES = {  # one dtype (the bare torch.dot path) and the others (per-tensor checks)
    "float64": [torch.float64] * 4,
    "float32": [torch.float32] * 4,
    "mixed": [torch.float64, torch.float32, torch.float64, torch.bfloat16],
    "complex": [torch.complex128, torch.float64, torch.complex128, torch.float64],
}


@pytest.mark.parametrize("precise", [False, True])
@pytest.mark.parametrize("kind", list(DTYPES))
def test_group_dots_equal_flat_inner_products_per_group(kind, precise):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 2), (7,)]
    groups = [0, 1, 0, 1]
    dtypes = DTYPES[kind]
    a = [torch.randn(s, generator=g, dtype=d) for s, d in zip(shapes, dtypes, strict=True)]
    b = [torch.randn(s, generator=g, dtype=d) for s, d in zip(shapes, dtypes, strict=True)]
    layout = ParamLayout(a, groups, 2)
    dots = layout.group_dots([(a, b), (a, a)], precise=precise)
    assert dots.dtype == torch.float64 and dots.shape == (2, 2)
    exact = all(d == torch.float64 or d == torch.complex128 for d in dtypes) or precise
    rtol = 1e-14 if exact else 1e-6
    # Re<a, b> over (real, imaginary) pairs, in float64, from one flat vector per group
    a = [real_view(t).double() for t in a]
    b = [real_view(t).double() for t in b]
    for row, (u, v) in zip(dots, [(a, b), (a, a)], strict=True):
        for group in (0, 1):
            flat_u = torch.cat(
                [t.reshape(-1) for t, k in zip(u, groups, strict=True) if k == group]
            )
            flat_v = torch.cat(
                [t.reshape(-1) for t, k in zip(v, groups, strict=True) if k == group]
            )
            torch.testing.assert_close(row[group], flat_u @ flat_v, rtol=rtol, atol=0)


def test_low_precision_dots_accumulate_in_float32_or_better():
    a = torch.full((4096,), 0.1, dtype=torch.bfloat16)
    exact = 4096 * float(a[0]) ** 2
    assert abs(float(dot(a, a)) - exact) / exact < 1e-5
