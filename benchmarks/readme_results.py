"""Write the README's headline results from the tables the benchmarks generated.

The README's results section lies between two markers; this command replaces what is
between them with the tables that the races wrote under ``docs/results/generated/`` (one
task's table each, as generated, with the command that wrote it), so that no number on the
front page is typed by hand::

    python -m benchmarks.readme_results            # rewrite README.md
    python -m benchmarks.readme_results --check    # fail if README.md is not up to date
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- headline results: start -->", "<!-- headline results: end -->"


@dataclass(frozen=True)
class Headline:
    """One generated table on the front page: a section of a generated file."""

    title: str
    file: str  # under docs/results/generated/
    heading: str | None  # the generated file's "### ..." section to take (None: all of it)
    command: str


HEADLINES = (
    Headline("Physics-informed networks: Poisson 2D", "pinn-race-2d.md", "poisson2d",
             "python -m benchmarks.pinn_race --tasks poisson2d heat1d --budget 150 --threads 1"),
    Headline("Neural operators: 1-D Burgers", "operator-race.md", "burgers",
             "python -m benchmarks.operator_race --budget 120 --threads 1"),
    Headline("Mini-batch deep learning: the two MLP tasks", "race.md", "summary",
             "python -m benchmarks.race --tasks mnist-mlp mnist-mlp-512 --budget 200 "
             "--eval-every 10 --threads 1"),
    Headline("The cost of a step", "step-time.md", None,
             "python -m benchmarks.step_time --models mlp cnn --repeats 61 --authors PATH"),
)  # fmt: skip


def section(text: str, heading: str | None) -> str:
    """The ``### heading...`` section of a generated markdown file (up to the next one)."""
    if heading is None:
        return text.strip()
    parts = re.split(r"(?m)^(?=### )", text)
    for part in parts:
        if part.startswith("### ") and part[4:].lower().startswith(heading.lower()):
            return part.split("\n", 1)[1].strip()
    raise KeyError(f"no '### {heading}' section")


def headlines(folder: Path) -> str:
    blocks = []
    for h in HEADLINES:
        path = folder / h.file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `{h.command}` with --markdown")
        table = section(path.read_text(encoding="utf-8"), h.heading)
        blocks.append(f"### {h.title}\n\n`{h.command}`\n\n{table}\n")
    return "\n".join(blocks)


def rewritten(readme: str, folder: Path) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README.md lacks the markers {START} and {END}")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{headlines(folder)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=ROOT / "docs/results/generated")
    parser.add_argument("--check", action="store_true", help="only check that it is up to date")
    args = parser.parse_args(argv)
    readme = args.readme.read_text(encoding="utf-8")
    new = rewritten(readme, args.results)
    if args.check:
        if new != readme:
            print("README.md's headline results differ from the generated tables", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
