"""Shared fixtures: the case matrix of :mod:`cases` as parametrised fixtures."""

from __future__ import annotations

import pytest
from cases import CASES, LOSSES, Case


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    """Every model of the case matrix."""
    return CASES[request.param]


@pytest.fixture(params=sorted(LOSSES))
def loss_name(request: pytest.FixtureRequest) -> str:
    """Every loss of the case matrix."""
    return request.param
