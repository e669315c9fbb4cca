"""Entry point of ``python -m curveball_experiments``."""

from __future__ import annotations

from collections.abc import Sequence

from curveball_experiments import cli


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the experiment(s) and return the exit status."""
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
