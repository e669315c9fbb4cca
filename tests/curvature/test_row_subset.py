"""Running a module on the leading part of its batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curveball._curvature.row_subset import LeadingRows, leading_rows


class _Seen(nn.Module):
    """Records the shapes of what it is called with; returns its first argument."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def forward(self, x, h=None, *, mask=None, scale=1.0):
        self.calls.append((x.shape, None if h is None else h.shape, mask, scale))
        return x * scale


def test_arguments_with_the_batch_size_are_cut_and_the_others_kept():
    module = _Seen()
    x, h, mask = torch.zeros(10, 3), torch.zeros(2, 10, 4), torch.ones(10, dtype=torch.bool)
    rows = LeadingRows(module, 0.25)
    with rows.active():
        out = module(x, h, mask=mask, scale=2.0)
    assert rows.outcome == "cut"
    (x_shape, h_shape, cut_mask, scale), = module.calls  # fmt: skip
    # ⌈0.25 · 10⌉ = 3 rows of every argument of leading size 10; h (leading size 2) is kept
    assert x_shape == (3, 3) and h_shape == (2, 10, 4) and cut_mask.shape == (3,)
    assert scale == 2.0 and out.shape == (3, 3)
    module(x)  # outside the context nothing is cut
    assert module.calls[-1][0] == (10, 3)


@pytest.mark.parametrize(
    ("batch", "fraction", "outcome", "seen"),
    [(1, 0.5, "whole", 1), (4, 1.0, "whole", 4), (4, 0.5, "cut", 2), (7, 0.3, "cut", 3)],
)
def test_the_outcome_and_the_number_of_rows(batch, fraction, outcome, seen):
    module = _Seen()
    rows = LeadingRows(module, fraction)
    with rows.active():
        module(torch.zeros(batch, 2))
    assert rows.outcome == outcome and module.calls[0][0][0] == seen


def test_a_module_never_called_is_unseen_and_the_hook_is_removed():
    module = _Seen()
    rows = LeadingRows(module, 0.5)
    with rows.active():
        pass
    assert rows.outcome == "unseen"
    assert not module._forward_pre_hooks


def test_leading_rows_of_the_predictions():
    full = torch.Size([12, 5])
    assert leading_rows(full, torch.Size([3, 5])) == 3
    assert leading_rows(full, torch.Size([12, 5])) == 12
    assert leading_rows(full, torch.Size([3, 4])) is None  # not rows of the same predictions
    assert leading_rows(full, torch.Size([13, 5])) is None
    assert leading_rows(full, torch.Size([3, 5, 1])) is None
    assert leading_rows(torch.Size([]), torch.Size([])) is None
