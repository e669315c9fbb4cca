"""The examples run as documented and end with the line the documentation promises."""

from __future__ import annotations

import re

import pytest

from examples import pinn_poisson


@pytest.mark.parametrize("way", [[], ["--pointwise"]])
def test_the_pinn_example_ends_with_its_relative_error(capsys, way):
    pinn_poisson.main(["--seconds", "1", *way])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"final relative L2 error: \d\.\d{3}e[+-]\d\d", last)


def test_the_fno_example_ends_with_its_test_error(tmp_path, capsys):
    pytest.importorskip("neuralop", reason="the operators extra is not installed")
    from examples import fno_burgers

    fno_burgers.main(["--train", "20", "--test", "4", "--epochs", "1", "--channels", "4",
                      "--batch-size", "10", "--cache", str(tmp_path)])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("epoch   1")
    assert re.fullmatch(r"test relative L2 error: \d+\.\d{4}", lines[-1])
