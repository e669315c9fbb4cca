"""The README's headline results are the generated tables, not typed ones."""

from __future__ import annotations

import pytest

from benchmarks import readme_results


def test_the_headlines_are_copied_from_the_generated_files_and_checked(tmp_path):
    folder = tmp_path / "generated"
    folder.mkdir()
    for h in readme_results.HEADLINES:
        body = f"| a | b |\n| --- | --- |\n| {h.file} | 1 |\n"
        text = f"### {h.heading}: x\n\n{body}\n### other\n\n| z |\n" if h.heading else body
        (folder / h.file).write_text(text)
    readme = tmp_path / "README.md"
    start, end = readme_results.START, readme_results.END
    readme.write_text(f"# title\n\n{start}\nold\n{end}\n\nrest\n")
    args = ["--readme", str(readme), "--results", str(folder)]
    assert readme_results.main([*args, "--check"]) == 1
    assert readme_results.main(args) == 0
    text = readme.read_text()
    assert text.startswith("# title\n") and text.endswith("\nrest\n") and "old" not in text
    for h in readme_results.HEADLINES:
        assert f"| {h.file} | 1 |" in text and f"`{h.command}`" in text
    assert "| z |" not in text  # only the named section
    assert readme_results.main([*args, "--check"]) == 0


def test_a_missing_table_names_the_command_that_writes_it(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{readme_results.START}\n{readme_results.END}\n")
    with pytest.raises(FileNotFoundError, match="run `python -m benchmarks"):
        readme_results.main(["--readme", str(readme), "--results", str(tmp_path)])


def test_the_committed_readme_shows_the_committed_tables():
    assert readme_results.main(["--check"]) == 0, "run `python -m benchmarks.readme_results`"
