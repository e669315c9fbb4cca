"""The TensorBoard example: every step's ρ, β, λ, trust ratio and loss reach the event files."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")

from examples import tensorboard_logging as example  # noqa: E402


def test_the_logged_curves_are_read_back_and_plotted(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    fake = {"x_train": torch.rand(512, 1, 28, 28, generator=g)}
    fake["y_train"] = torch.randint(0, 10, (512,), generator=g)
    monkeypatch.setattr(example, "mnist_8k_2k", lambda data_dir: fake)
    example.train("unused", epochs=1, logdir=str(tmp_path / "tb"), batch_size=64)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert len(events.Scalars("curveball/lambd")) == 8
    assert [s.step for s in events.Scalars("curveball/trust_ratio")] == [5]  # test steps only
    assert len(events.Scalars("curveball/loss")) == 8
    example.plot(str(tmp_path / "tb"), str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
