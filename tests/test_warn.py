"""Warnings point at the user's line and come once per kind."""

from __future__ import annotations

import warnings

from curveball._warn import OnceWarner, warn


def test_warning_is_attributed_to_the_caller():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn("look here")  # this line
    assert caught[0].filename == __file__


def test_once_warner_gives_each_kind_once():
    once = OnceWarner()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            once("a", "fault a")
            once("b", "fault b")
    assert [str(w.message).split(" (")[0] for w in caught] == ["fault a", "fault b"]
