"""The neural-operator benchmarks' data: the FNO paper's Burgers and Darcy pairs, generated
at run time by the solvers of :mod:`.burgers` and :mod:`.darcy` and cached on disk.

Nothing here is committed: a data set is a ``.npz`` file in the cache folder (``--cache``,
else the environment variable ``CURVEBALL_CACHE``, else ``~/.cache/curveball-benchmarks``),
named by everything that determines it, so a second request with the same :class:`DataSpec`
reads the same arrays back instead of solving again.

Sizes (:data:`SIZES`): ``quick`` for the tests (seconds), ``default`` for two CPU cores
(512 training and 128 test pairs; Burgers solved on 1,024 points and kept at 128, Darcy
solved on 129 × 129 nodes and kept at 33 × 33), ``full`` near the paper's (1,000 and 200
pairs; Burgers 2,048 → 1,024 points, Darcy 169 × 169 → 85 × 85 nodes).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.operator_data import burgers, darcy

FORMAT = 2
"""Bumped whenever a solver's output changes, so that old cache files are not read."""

DEFAULT_CACHE = Path("~/.cache/curveball-benchmarks")


@dataclass(frozen=True)
class DataSpec:
    """What determines a data set: the problem, the sizes, the grids and the seed.

    ``fine`` is the solver's grid (points for Burgers, nodes per side for Darcy) and
    ``resolution`` the subsampled grid the models see.
    """

    problem: str  # "burgers" or "darcy"
    train: int
    test: int
    fine: int
    resolution: int
    seed: int = 0

    def filename(self) -> str:
        return (
            f"{self.problem}-train{self.train}-test{self.test}-fine{self.fine}"
            f"-s{self.resolution}-seed{self.seed}-v{FORMAT}.npz"
        )


SIZES: dict[str, dict[str, DataSpec]] = {
    "quick": {
        "burgers": DataSpec("burgers", 16, 8, fine=128, resolution=32),
        "darcy": DataSpec("darcy", 16, 8, fine=33, resolution=17),
    },
    "default": {
        "burgers": DataSpec("burgers", 512, 128, fine=1024, resolution=128),
        "darcy": DataSpec("darcy", 512, 128, fine=129, resolution=33),
    },
    "full": {
        "burgers": DataSpec("burgers", 1000, 200, fine=2048, resolution=1024),
        "darcy": DataSpec("darcy", 1000, 200, fine=169, resolution=85),
    },
}
"""The data sets by size and problem. Darcy's 33 × 33 (every 4th node of 129, boundary
included, like the paper's every 5th of 421 → 85) rather than 32 × 32 or 43 × 43: it keeps
both boundary lines, and its FFTs are fast (43 is prime, and an FNO step on 43 × 43 took
three times as long as on 33 × 33 on this machine's CPUs)."""

_GENERATORS = {"burgers": burgers.generate, "darcy": darcy.generate}


def cache_folder(cache: str | os.PathLike | None = None) -> Path:
    """``cache``, else ``$CURVEBALL_CACHE``, else ``~/.cache/curveball-benchmarks``."""
    chosen = cache if cache is not None else os.environ.get("CURVEBALL_CACHE") or DEFAULT_CACHE
    return Path(chosen).expanduser()


def generate(spec: DataSpec) -> dict[str, np.ndarray]:
    """Solve ``spec.train + spec.test`` problems (training pairs first) from the seeded
    generator ``numpy.random.default_rng([spec.seed, problem number])``."""
    if spec.problem not in _GENERATORS:
        raise ValueError(f"problem: expected one of {sorted(_GENERATORS)}, got {spec.problem!r}")
    rng = np.random.default_rng([spec.seed, sorted(_GENERATORS).index(spec.problem)])
    x, y = _GENERATORS[spec.problem](rng, spec.train + spec.test, spec.fine, spec.resolution)
    return {"x_train": x[: spec.train], "y_train": y[: spec.train],
            "x_test": x[spec.train :], "y_test": y[spec.train :]}  # fmt: skip


def load(spec: DataSpec, cache: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The data set of ``spec``: read from the cache folder, or generated and saved there.

    Returns ``x_train``, ``y_train``, ``x_test``, ``y_test`` (float32, ``(pairs, *grid)``)
    and ``seconds``, the time the generation took (when the file was written; the file
    also records the spec, under ``spec``, for whoever opens it by hand).
    """
    path = cache_folder(cache) / spec.filename()
    if path.is_file():
        with np.load(path) as saved:
            return {key: saved[key] for key in saved.files if key != "spec"}
    start = time.perf_counter()
    data = generate(spec)
    data["seconds"] = np.array(time.perf_counter() - start)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
    np.savez(partial, spec=np.array(repr(asdict(spec))), **data)
    partial.replace(path)  # atomic: a reader never sees a half-written file
    return data
