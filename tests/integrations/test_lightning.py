"""CurveBall in PyTorch Lightning: manual optimization, logging, checkpoints, schedulers, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning", reason="the lightning test extra is not installed")

from tests.integrations import lightning_job as job  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_a_training_step_gets_the_loss_and_the_loggers_see_the_step():
    module = job.Classifier()
    fit = job.trainer(2, enable_checkpointing=False)
    fit.fit(module)
    assert fit.global_step == 2 * job.BATCHES
    assert len(module.losses) == 6 and module.losses[-1] < module.losses[0]
    optimizer = fit.optimizers[0]
    for name in ("rho", "beta", "lambd", "trust_ratio", "loss"):
        assert f"curveball/{name}" in fit.callback_metrics
    assert float(fit.callback_metrics["curveball/lambd"]) == pytest.approx(optimizer.last.lambd)


def test_a_modelcheckpoint_resumes_exactly(tmp_path):
    straight = job.Classifier()
    job.trainer(2, enable_checkpointing=False).fit(straight)

    first = job.Classifier()
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    job.trainer(1, callbacks=[saver]).fit(first)
    resumed = job.Classifier()
    fit = job.trainer(2, enable_checkpointing=False)
    fit.fit(resumed, ckpt_path=str(tmp_path / "last.ckpt"))
    assert fit.optimizers[0].steps == 2 * job.BATCHES
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert first.losses + resumed.losses == straight.losses


def test_a_scheduler_configured_the_lightning_way_drives_the_learning_rate():
    module = job.Classifier(scheduler=True)
    fit = job.trainer(2, enable_checkpointing=False)
    fit.fit(module)
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(
        0.5**3
    )  # 6 steps, halving every 2


def test_two_ddp_processes_equal_one_process_on_the_whole_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    outputs = {}
    for strategy, devices in (("auto", 1), ("ddp", 2)):
        out = tmp_path / f"{strategy}.pt"
        command = [sys.executable, "-m", "tests.integrations.lightning_job", str(out), strategy]
        subprocess.run([*command, str(devices)], cwd=ROOT, env=env, check=True, timeout=300)
        outputs[strategy] = torch.load(out)
    single, ddp = outputs["auto"], outputs["ddp"]
    assert ddp["steps"] == single["steps"] == 2 * job.BATCHES
    for a, b in zip(single["params"], ddp["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert ddp["lambd"] == pytest.approx(single["lambd"], rel=1e-10)
