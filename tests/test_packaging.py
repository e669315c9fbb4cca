"""The distribution: a wheel that installs and imports in a fresh environment, library only."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import curveball

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("build", reason="the 'build' package is not installed")
    out = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)]
    subprocess.run([*command, str(ROOT)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("curveball-*.whl")
    return path


def test_the_wheel_holds_the_library_its_type_marker_and_license_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "curveball/py.typed" in names and "curveball/__init__.py" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert not any(n.startswith(("curveball_experiments", "benchmarks", "tests")) for n in names)
    entry_points = [n for n in names if n.endswith("entry_points.txt")]
    assert not entry_points  # no console script


def test_the_wheel_installs_and_imports_in_a_fresh_environment(wheel, tmp_path):
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_CONSTRAINT")}
    # The fresh environment sees the running interpreter's packages (torch among them),
    # inside a virtual environment as outside one, after its own (the wheel's curveball).
    # A path in a .pth file is added as is: the .pth files in it (an editable curveball's
    # finder) are not run.
    target = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, env=env,
    ).stdout.strip()  # fmt: skip
    running = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(target) / "running-interpreter.pth").write_text("\n".join(sorted(running)) + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)],
        check=True,
        timeout=300,
        env=env,
    )
    probe = (
        "import curveball, torch; "
        "m = torch.nn.Linear(3, 2); o = curveball.CurveBall(m); x = torch.randn(4, 3); "
        "o.step(lambda: m(x), lambda y: y.pow(2).mean()); "
        "print(curveball.__version__, curveball.__file__)"
    )
    result = subprocess.run(
        [str(python), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
        env=env,
    )  # fmt: skip
    version, location = result.stdout.split()
    assert version == curveball.__version__ and location.startswith(str(env_dir))
