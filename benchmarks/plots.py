"""What the races' figures share: matplotlib without a display, log-scale axes, a file each.

The races (:mod:`benchmarks.race`, :mod:`benchmarks.pinn_race`,
:mod:`benchmarks.operator_race`) draw their own curves; this module holds the setup
around them, so that every figure is drawn off-screen, scaled and saved the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the off-screen Agg backend (imported only when a figure is
    asked for: matplotlib is an extra of the benchmarks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_axes(ax: Any, xlabel: str, ylabel: str) -> None:
    """A log-scale y axis with its labels and a light grid."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def save(fig: Any, folder: str | Path, name: str, dpi: int = 80) -> None:
    """Lay ``fig`` out, write it to ``folder/name.png`` (creating the folder) and close it."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(Path(folder) / f"{name}.png", dpi=dpi)
    pyplot().close(fig)
