"""Every experiment end to end in ``--quick`` mode through ``main([...])``."""

from __future__ import annotations

import functools
import json
import statistics
from pathlib import Path

import pytest

from curveball_experiments.__main__ import main

PNG = b"\x89PNG\r\n\x1a\n"


def check_outputs(out: Path, name: str) -> dict:
    """results.json is well formed, table.md and the PNG plots exist."""
    folder = out / name
    results = json.loads((folder / "results.json").read_text())
    assert results["experiment"] == name
    assert {"rows", "curves", "settings", "versions", "device", "notes"} <= set(results)
    assert {"torch", "curveball"} <= set(results["versions"])
    assert results["rows"]
    for row in results["rows"]:
        assert {"problem", "optimizer", "metric", "values", "median"} <= set(row)
        assert isinstance(row["problem"], str) and isinstance(row["optimizer"], str)
        assert isinstance(row["metric"], str)
        values = [v for v in row["values"] if v is not None]
        assert values and all(isinstance(v, (int, float)) for v in values)
        assert row["median"] == pytest.approx(statistics.median(values))
    assert "CurveBall" in {row["optimizer"] for row in results["rows"]}
    table = (folder / "table.md").read_text()
    assert "| problem | optimizer |" in table
    pngs = sorted(folder.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == PNG for p in pngs)
    assert any("vs_iteration" in p.name for p in pngs)
    assert any("vs_time" in p.name for p in pngs)
    return results


def test_rosenbrock_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rosenbrock", "--quick", "--seeds", "2", "--out", str(tmp_path)]) == 0
    results = check_outputs(tmp_path, "rosenbrock")
    problems = {row["problem"] for row in results["rows"]}
    assert len(problems) == 3
    optimizers = {row["optimizer"] for row in results["rows"]}
    assert optimizers == {"CurveBall", "SGD", "Adam", "L-BFGS", "Levenberg-Marquardt"}
    assert all(len(row["values"]) == 2 for row in results["rows"])
    assert "chosen_lr" in str(results["settings"]["lr_search"])
    assert "| rosenbrock deterministic | CurveBall |" in capsys.readouterr().out


def test_linear_quick(tmp_path: Path) -> None:
    assert main(["linear", "--quick", "--out", str(tmp_path)]) == 0
    results = check_outputs(tmp_path, "linear")
    assert results["settings"]["condition_number"] == 1e5


def test_mnist_quick_on_fake_idx_files(tmp_path: Path, data_root: Path) -> None:
    code = main(["mnist", "--quick", "--out", str(tmp_path), "--data-dir", str(data_root)])
    assert code == 0
    results = check_outputs(tmp_path, "mnist")
    assert {row["problem"] for row in results["rows"]} == {"mlp", "mlp 512 relu", "basic cnn"}
    assert {"train loss @1", "val acc @1"} <= {row["metric"] for row in results["rows"]}


def test_mnist_data_dir_may_be_the_idx_folder_itself(tmp_path: Path, data_root: Path) -> None:
    from curveball_experiments import datasets

    assert datasets.find_mnist(data_root) == data_root / "mnist"
    assert datasets.find_mnist(data_root / "mnist") == data_root / "mnist"
    assert datasets.find_mnist(tmp_path / "nothing") is None


def test_mnist_honours_the_environment_variable(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CURVEBALL_DATA", str(data_root / "mnist"))
    assert main(["mnist", "--quick", "--epochs", "1", "--out", str(tmp_path)]) == 0
    check_outputs(tmp_path, "mnist")


def test_cifar10_quick_on_fake_batches(tmp_path: Path, data_root: Path) -> None:
    code = main(["cifar10", "--quick", "--out", str(tmp_path), "--data-dir", str(data_root)])
    assert code == 0
    results = check_outputs(tmp_path, "cifar10")
    assert {row["problem"] for row in results["rows"]} == {
        "basic cnn",
        "basic cnn + bn",
        "resnet-18",
    }


def test_imagenet_quick_on_fake_image_folder(tmp_path: Path, data_root: Path) -> None:
    argv = ["imagenet", "--quick", "--out", str(tmp_path), "--data-dir", str(data_root)]
    assert main([*argv, "--classes", "2", "--image-size", "64"]) == 0
    results = check_outputs(tmp_path, "imagenet")
    assert results["settings"]["classes"] == 2


def test_random_archs_quick_on_synthetic_data(tmp_path: Path) -> None:
    assert main(["random-archs", "--quick", "--out", str(tmp_path)]) == 0
    results = check_outputs(tmp_path, "random-archs")
    wins = [row for row in results["rows"] if row["metric"] == "wins"]
    assert sum(sum(row["values"]) for row in wins) == 3
    assert len(results["settings"]["architectures"]) == 3
    assert any("Synthetic" in note for note in results["notes"])


def test_random_archs_use_mnist_when_present(tmp_path: Path, data_root: Path) -> None:
    argv = ["random-archs", "--quick", "--archs", "1", "--out", str(tmp_path)]
    assert main([*argv, "--data-dir", str(data_root)]) == 0
    results = check_outputs(tmp_path, "random-archs")
    assert "MNIST" in results["settings"]["dataset"]


def test_all_skips_absent_data_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from curveball_experiments import cli

    ran = []
    monkeypatch.setattr(cli, "run_one", lambda name, args, data_dir: ran.append(name) or "")
    assert main(["all", "--quick", "--out", str(tmp_path), "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ran == ["rosenbrock", "linear", "random-archs"]
    for name in ("mnist", "cifar10", "imagenet"):
        assert f"{name}: skipped" in out


def test_all_runs_the_data_experiments_whose_files_exist(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from curveball_experiments import cli

    ran = []
    monkeypatch.setattr(cli, "run_one", lambda name, args, data_dir: ran.append(name) or "")
    assert main(["all", "--quick", "--out", str(tmp_path), "--data-dir", str(data_root)]) == 0
    assert ran == ["rosenbrock", "linear", "mnist", "cifar10", "imagenet", "random-archs"]


def test_a_named_experiment_without_its_data_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cifar10", "--out", str(tmp_path)]) == 2
    assert "cifar10: cannot run" in capsys.readouterr().err


def test_curveball_options_reach_every_curveball_and_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from curveball import CurveBall
    from curveball_experiments import optimizers

    built = []
    original = CurveBall.__init__

    @functools.wraps(original)  # keeps the signature, which the reports read
    def spy(self, *args, **kwargs):
        built.append(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(CurveBall, "__init__", spy)
    argv = ["linear", "--quick", "--seeds", "1", "--out", str(tmp_path)]
    assert main([*argv, "--curveball", "lambd=0.5", "lambda_thresholds=(0.5, 1.5)"]) == 0
    expected = {"lambd": 0.5, "lambda_thresholds": (0.5, 1.5)}
    assert len(built) > 1 and all(kwargs == expected for kwargs in built)
    notes = " ".join(json.loads((tmp_path / "linear" / "results.json").read_text())["notes"])
    assert "except lambd=0.5, lambda_thresholds=(0.5, 1.5)" in notes
    shown = (  # lr, then every default that is not the paper's
        f"lr=1.0, lambd=0.1, lambda_factor={(2 / 3) ** 0.2!r}, lambda_thresholds=(0.25, 0.75), "
        "lambda_min=0.05, precondition=True, reject_uphill=True"
    )
    assert f"defaults ({shown}, automatic rho and beta)" in notes
    built.clear()
    assert main(argv) == 0  # the next run is back at the defaults
    assert built and all(kwargs == {} for kwargs in built)
    assert optimizers.CURVEBALL_OPTIONS == {}


def test_paper_runs_the_authors_method_with_curveball_keywords_on_top(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from curveball import PAPER_DEFAULTS, CurveBall

    built = []
    original = CurveBall.__init__

    @functools.wraps(original)
    def spy(self, *args, **kwargs):
        built.append(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(CurveBall, "__init__", spy)
    argv = ["linear", "--quick", "--seeds", "1", "--out", str(tmp_path), "--paper"]
    assert main(argv) == 0
    assert built and all(kwargs == PAPER_DEFAULTS for kwargs in built)
    notes = " ".join(json.loads((tmp_path / "linear" / "results.json").read_text())["notes"])
    assert "CurveBall: the paper's settings (curveball.PAPER_DEFAULTS), no tuning" in notes
    built.clear()
    assert main([*argv, "--curveball", "lambd=0.5", "precondition_eps=1e-6"]) == 0
    assert all(k == {**PAPER_DEFAULTS, "lambd": 0.5, "precondition_eps": 1e-6} for k in built)
    notes = " ".join(json.loads((tmp_path / "linear" / "results.json").read_text())["notes"])
    assert "(curveball.PAPER_DEFAULTS) except lambd=0.5, precondition_eps=1e-06, no" in notes


@pytest.mark.parametrize(
    "option, error",
    [("lambd", SystemExit), ("lambd=x y", SystemExit), ("lambd=-1", ValueError),
     ("speed=2", TypeError)],
)  # fmt: skip
def test_bad_curveball_options_fail_before_anything_runs(tmp_path: Path, option, error) -> None:
    with pytest.raises(error):
        main(["linear", "--quick", "--out", str(tmp_path), "--curveball", option])
    assert not (tmp_path / "linear").exists()
