"""Results of one experiment: ``results.json``, ``table.md`` and the plots.

A :class:`Report` collects rows (one per problem, optimizer and metric, with one
value per seed), loss curves per run, settings, notes and checks of the paper's
claims, then writes everything under ``OUT/NAME/``. Plots use matplotlib's Agg
backend, imported only when they are drawn.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

MAX_CURVE_POINTS = 400
"""Curves are thinned to about this many points per run before they are stored."""


PROGRESS_SECONDS = 30.0
"""Without a terminal, a progress line is printed at most this often (and at the end)."""


class LineProgress:
    """Progress as plain lines, for output piped to a file or a CI log."""

    def __init__(self, total: int, desc: str, every: float = PROGRESS_SECONDS) -> None:
        self.total, self.desc, self.every = total, desc, every
        self.done, self.postfix = 0, ""
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            self._print(now)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        pass

    def _print(self, now: float) -> None:
        share = 100.0 * self.done / max(self.total, 1)
        extra = f" ({self.postfix})" if self.postfix else ""
        print(
            f"{self.desc}: {self.done}/{self.total} steps ({share:.0f}%), "
            f"{now - self.start:.0f} s{extra}",
            flush=True,
        )


def progress(total: int, desc: str) -> Any:
    """A tqdm progress bar on a terminal; progress lines every 30 s when output is piped."""
    if not sys.stderr.isatty():
        return LineProgress(total, desc)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


def versions() -> dict[str, str]:
    """Versions of the software that produced a result."""
    try:
        curveball_version = metadata.version("curveball")
    except metadata.PackageNotFoundError:  # pragma: no cover - source checkout only
        curveball_version = "unknown"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "curveball": curveball_version,
    }


def thin_indices(length: int, max_points: int = MAX_CURVE_POINTS) -> list[int]:
    """Indices ``0..length-1`` thinned to about ``max_points``: dense at the start
    (geometric spacing) and even spacing elsewhere; the last index is always kept."""
    if length <= max_points:
        return list(range(length))
    half = max_points // 2
    geometric = {int(round(x)) for x in _geomspace(1, length - 1, half)}
    linear = {int(round(i * (length - 1) / (half - 1))) for i in range(half)}
    return sorted({0, length - 1} | geometric | linear)


def _geomspace(start: float, stop: float, count: int) -> list[float]:
    ratio = (stop / start) ** (1.0 / max(count - 1, 1))
    return [start * ratio**i for i in range(count)]


def _clean(value: float) -> float | None:
    return value if math.isfinite(value) else None


def format_number(value: float | None) -> str:
    """Four significant digits, or ``-`` for a missing value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if float(value).is_integer() and abs(value) < 1e7:
        return str(int(value))
    return f"{value:.4g}"


def spread(values: Sequence[float | None], median: float | None) -> str:
    """``median (min-max)`` or just the value for a single seed."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return format_number(values[0])
    return f"{format_number(median)} ({format_number(min(values))}–{format_number(max(values))})"


class Report:
    """Everything one experiment produces.

    Args:
        experiment: the experiment's name (also the output sub-folder).
        out_dir: the ``--out`` folder.
        device: where the runs ran.
    """

    def __init__(self, experiment: str, out_dir: Path | str, device: str = "cpu") -> None:
        self.experiment = experiment
        self.out_dir = Path(out_dir) / experiment
        self.device = device
        self.rows: list[dict[str, Any]] = []
        self.curves: dict[str, dict[str, list[dict[str, list[float | None]]]]] = {}
        self.settings: dict[str, Any] = {}
        self.notes: list[str] = []
        self.checks: list[dict[str, Any]] = []
        self.columns: dict[tuple[str, str], dict[str, str]] = {}
        self.metric_labels: dict[str, str] = {}
        self.hidden_metrics: set[str] = set()
        self.formats: dict[str, Callable[[list[float], float], str]] = {}
        self.curve_label = "loss"
        self.curve_labels: dict[str, str] = {}  # per problem, where it differs
        self.log_x = False

    # ----------------------------------------------------------------- collecting
    def add_row(self, problem: str, optimizer: str, metric: str, values: Sequence[float]) -> None:
        """One row: a metric of one optimizer on one problem, one value per seed.

        A non-finite value (a diverged run) is stored as ``null`` and left out of
        the median.
        """
        clean = [_clean(float(v)) for v in values]
        finite = [v for v in clean if v is not None]
        self.rows.append(
            {
                "problem": problem,
                "optimizer": optimizer,
                "metric": metric,
                "values": clean,
                "median": statistics.median(finite) if finite else None,
            }
        )

    def add_curve(
        self,
        problem: str,
        optimizer: str,
        loss: Sequence[float],
        seconds: Sequence[float],
        iterations: Sequence[int] | None = None,
    ) -> None:
        """One run's loss curve (thinned before it is stored)."""
        if iterations is None:
            iterations = range(len(loss))
        keep = thin_indices(len(loss))
        self.curves.setdefault(problem, {}).setdefault(optimizer, []).append(
            {
                "iteration": [int(iterations[i]) for i in keep],
                "loss": [_clean(float(loss[i])) for i in keep],
                "seconds": [float(seconds[i]) for i in keep],
            }
        )

    def add_runs(
        self,
        problem: str,
        optimizer: str,
        traces: Sequence[Any],
        cap: int,
        lr: float | None = None,
        label: str = "loss",
    ) -> None:
        """Rows and curves of runs-to-convergence (``traces`` from the small problems);
        ``label`` says what the curves are."""
        iterations = [cap if t.iterations is None else t.iterations for t in traces]
        self.add_row(problem, optimizer, "iterations", iterations)
        self.add_row(
            problem, optimizer, "converged", [0 if t.iterations is None else 1 for t in traces]
        )
        self.add_row(problem, optimizer, "seconds", [t.seconds[-1] for t in traces])
        for trace in traces:
            self.add_curve(problem, optimizer, trace.objective, trace.seconds)
        self.columns[(problem, optimizer)] = {"lr": "tuned " + format_number(lr) if lr else "-"}
        self.formats.setdefault("converged", lambda v, m: f"{int(sum(v))}/{len(v)}")
        self.metric_labels.setdefault("iterations", "iterations, median (min–max)")
        self.metric_labels.setdefault("seconds", "seconds, median (min–max)")
        self.log_x = True
        self.curve_labels[problem] = label

    def median(self, problem: str, optimizer: str, metric: str) -> float | None:
        """The median of a row, or ``None`` when there is no such row."""
        for row in self.rows:
            if (row["problem"], row["optimizer"], row["metric"]) == (problem, optimizer, metric):
                return row["median"]
        return None

    def check(self, claim: str, met: bool, detail: str) -> None:
        """Record whether one of the paper's claims holds in this run."""
        self.checks.append({"claim": claim, "met": bool(met), "detail": detail})

    # ------------------------------------------------------------------- writing
    def results(self) -> dict[str, Any]:
        """The content of ``results.json``."""
        return {
            "experiment": self.experiment,
            "rows": self.rows,
            "checks": self.checks,
            "settings": self.settings,
            "notes": self.notes,
            "versions": versions(),
            "device": self.device,
            "curves": {
                "quantity": self.curve_label,
                "quantity_per_problem": self.curve_labels,
                "runs": self.curves,
            },
        }

    def table(self) -> str:
        """The markdown table (one line per problem and optimizer; metrics in
        ``hidden_metrics`` stay in ``results.json`` only)."""
        metrics: list[str] = []
        keys: list[tuple[str, str]] = []
        cells: dict[tuple[str, str, str], str] = {}
        for row in self.rows:
            key = (row["problem"], row["optimizer"])
            if key not in keys:
                keys.append(key)
            if row["metric"] not in metrics and row["metric"] not in self.hidden_metrics:
                metrics.append(row["metric"])
            fmt = self.formats.get(row["metric"], spread)
            cells[key + (row["metric"],)] = fmt(row["values"], row["median"])
        extra: list[str] = []
        for key in keys:
            for name in self.columns.get(key, {}):
                if name not in extra:
                    extra.append(name)
        header = ["problem", "optimizer"] + extra + [self.metric_labels.get(m, m) for m in metrics]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key in keys:
            values = list(key)
            values += [self.columns.get(key, {}).get(name, "-") for name in extra]
            values += [cells.get(key + (m,), "-") for m in metrics]
            lines.append("| " + " | ".join(values) + " |")
        return "\n".join(lines) + "\n"

    def write(self) -> str:
        """Write ``results.json``, ``table.md`` and the plots; return the table."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "results.json", "w", encoding="utf-8") as f:
            json.dump(self.results(), f, indent=1, allow_nan=False)
        table = self.table()
        text = f"# {self.experiment}\n\n{table}"
        if self.checks:
            text += "\n" + "\n".join(
                f"- [{'x' if c['met'] else ' '}] {c['claim']} ({c['detail']})" for c in self.checks
            )
            text += "\n"
        if self.notes:
            text += "\nNotes:\n\n" + "\n".join(f"- {n}" for n in self.notes) + "\n"
        (self.out_dir / "table.md").write_text(text, encoding="utf-8")
        self.plot()
        return text

    def plot(self) -> None:
        """Loss against iteration and against wall-clock, one line per optimizer.

        The line is the median over seeds (one diverging seed cannot move it, nor
        the y-range, which frames the medians), the band the range from the lowest
        to the highest seed. A run that stopped early (converged) is carried at its
        last value to the end, so the line does not jump when it stops, and the
        wall-clock axis (the median over seeds of each one's time, carried likewise)
        never runs backwards.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        for problem, optimizers in self.curves.items():
            stem = slug(problem)
            for axis in ("iteration", "time"):
                fig, ax = plt.subplots(figsize=(6.4, 4.2))
                fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.92)
                log_x = self.log_x
                shown: list[Any] = []
                for optimizer, runs in optimizers.items():
                    grid, loss, seconds = _aligned(runs, np)
                    if grid.size == 0:
                        continue
                    with np.errstate(all="ignore"), warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        centre = np.nanmedian(loss, axis=0)
                        low = np.nanmin(loss, axis=0)
                        high = np.nanmax(loss, axis=0)
                        x = grid if axis == "iteration" else np.nanmedian(seconds, axis=0)
                        if axis == "time":
                            x = np.fmax.accumulate(x)  # medians of non-decreasing times
                    keep = np.isfinite(centre) & np.isfinite(x) & (centre > 0)
                    if log_x:
                        keep &= x >= 1 if axis == "iteration" else x > 0
                    if not keep.any():
                        continue
                    shown.append(centre[keep])
                    (line,) = ax.plot(x[keep], centre[keep], label=optimizer)
                    if loss.shape[0] > 1:
                        ax.fill_between(
                            x[keep], low[keep], high[keep], color=line.get_color(), alpha=0.2
                        )
                ax.set_yscale("log")
                if shown:
                    # The band of a diverging seed can reach 1e100: frame the mean lines.
                    values = np.concatenate(shown)
                    ax.set_ylim(values.min() / 10.0, values.max() * 10.0)
                if log_x:
                    ax.set_xscale("log")
                ax.set_xlabel("iteration" if axis == "iteration" else "wall-clock (s)")
                ax.set_ylabel(self.curve_labels.get(problem, self.curve_label))
                ax.set_title(problem)
                ax.grid(True, which="both", alpha=0.3)
                if ax.lines:
                    ax.legend()
                fig.savefig(self.out_dir / f"{stem}_vs_{axis}.png", dpi=100)
                plt.close(fig)


def _aligned(runs: list[dict[str, list[Any]]], np: Any) -> tuple[Any, Any, Any]:
    """Interpolate every run onto the union of their stored iterations; after a
    run's end its last loss and time are carried to the end of the grid."""
    grid = np.unique(np.concatenate([np.asarray(r["iteration"], dtype=float) for r in runs]))
    loss = np.full((len(runs), grid.size), np.nan)
    seconds = np.full((len(runs), grid.size), np.nan)
    for i, run in enumerate(runs):
        it = np.asarray(run["iteration"], dtype=float)
        values = np.asarray([np.nan if v is None else v for v in run["loss"]], dtype=float)
        with np.errstate(all="ignore"):  # np.interp holds the last value beyond the end
            logs = np.log(np.clip(values, 1e-300, None))
            loss[i] = np.exp(np.interp(grid, it, logs))
            seconds[i] = np.interp(grid, it, np.asarray(run["seconds"]))
    return grid, loss, seconds


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    out = []
    for ch in text.lower():
        if ch.isascii() and ch.isalnum():
            out.append(ch)
        elif ch in "ε":
            out.append("eps")
        elif out and out[-1] != "_":
            out.append("_")
    return "".join(out).strip("_") or "plot"
