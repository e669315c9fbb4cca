"""The prepared GPU check on the CPU (``--quick``): a complete, well-formed report; a
contender that fails is an entry with its error and the rest runs (no timing checks)."""

from __future__ import annotations

import itertools
import json
import math

import torch

from benchmarks import common, gpu_check

MODELS = ("resnet18", "gpt2-small", "vit-s")


def test_the_quick_check_reports_every_model_contender_and_precision(tmp_path):
    out = tmp_path / "gpu_check.json"
    report = gpu_check.run(["--device", "cpu", "--quick", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    keys = [(e["model"], e["contender"], e["precision"]) for e in report["steps"]]
    assert keys == list(itertools.product(MODELS, gpu_check.CONTENDERS, gpu_check.PRECISIONS))
    for e in report["steps"]:
        assert e["peak_memory_bytes"] is None  # measured on CUDA only
        if e["error"] is None:
            assert e["step_ms"] > 0 and e["repeats"] >= 1 and math.isfinite(e["loss"])
        else:
            assert isinstance(e["error"], str) and e["step_ms"] is None
        engines = {"curveball": {"forward", "double-backward"},
                   "curveball-double-backward": {"double-backward"}}  # fmt: skip
        if e["contender"] in engines and e["error"] is None:
            assert e["engine"] in engines[e["contender"]]  # the engine that ran
        else:
            assert e["engine"] is None
    race = report["race"]
    assert [row["contender"] for row in race["rows"]] == list(gpu_check.RACE_CONTENDERS)
    for row in race["rows"]:
        assert row["error"] is None and row["steps"] >= 1
        steps = [step for step, _, _ in row["curve"]]
        assert steps[0] == 0 and steps == sorted(steps) and steps[-1] == row["steps"]
        assert all(math.isfinite(loss) for _, _, loss in row["curve"])
        assert row["initial_loss"] == race["rows"][0]["initial_loss"]  # the same weights


def test_a_contender_that_fails_is_an_error_entry_and_the_rest_runs(monkeypatch):
    make_step = gpu_check.make_step

    def out_of_memory(name, model, device, precision, lr=None):
        if name == "curveball" and precision == "bf16":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return make_step(name, model, device, precision, lr)

    monkeypatch.setattr(gpu_check, "make_step", out_of_memory)
    settings = gpu_check.Settings(torch.device("cpu"), warmup=0, repeats=1, entry_seconds=1.0,
                                  seed=0)  # fmt: skip
    vit = [w for w in gpu_check.workloads(quick=True) if w.name == "vit-s"]
    entries = gpu_check.time_all(vit, settings, deadline=math.inf)
    failed = [e for e in entries if e["error"] is not None]
    assert [(e["contender"], e["precision"]) for e in failed] == [("curveball", "bf16")]
    assert failed[0]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert all(e["step_ms"] > 0 for e in entries if e["error"] is None)
    assert len(entries) == len(gpu_check.CONTENDERS) * len(gpu_check.PRECISIONS)


def test_past_the_deadline_an_entry_says_it_was_not_run():
    settings = gpu_check.Settings(torch.device("cpu"), 0, 1, 1.0, 0)
    entries = gpu_check.time_all(gpu_check.workloads(quick=True)[:1], settings, deadline=0.0)
    assert all(e["error"].startswith("not run") and e["step_ms"] is None for e in entries)


def test_the_full_models_have_the_stated_sizes():
    with torch.device("meta"):  # shapes only: no memory, no time
        sizes = {w.name: common.count_parameters(w.build()) for w in gpu_check.workloads(False)}
    assert sizes == {"resnet18": 11_173_962, "gpt2-small": 162_694_225, "vit-s": 22_050_664}
    gpt = next(w for w in gpu_check.workloads(False) if w.name == "gpt2-small")
    assert (gpt.seq, gpt.classes, gpt.batch_size) == (512, 50257, 8)
    x, t = gpt.batch(0)
    assert x.shape == (8, 512) and t.shape == (8 * 512,)
