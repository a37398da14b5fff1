"""The README's result paragraphs are the report's, from the committed CSVs (no hand-typed number)."""
from pathlib import Path

import pytest

from fastdiff.report.readme import readme_blocks, summary, update_readme

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_results_blocks_match_the_committed_csvs():
    blocks = readme_blocks(ROOT / "README.md")
    assert "digits" in blocks, "README.md lost its <!-- results: digits --> block"
    for name, text in blocks.items():
        assert text == summary(ROOT / "results" / name / "fid_vs_steps.csv", name), (
            f"README.md's results block {name!r} differs from results/{name}: run python -m fastdiff.report results "
            "--readme README.md")


def test_update_readme_rewrites_only_the_blocks(tmp_path):
    import shutil

    from fastdiff.errors import FastdiffError

    shutil.copytree(ROOT / "results" / "digits", tmp_path / "res" / "digits")
    readme = tmp_path / "README.md"
    readme.write_text("intro 1.23\n<!-- results: digits -->\nold 9.99\n<!-- /results -->\nafter 4.56\n")
    assert update_readme(readme, tmp_path / "res") == ["digits"]
    text = readme.read_text()
    assert text.startswith("intro 1.23\n<!-- results: digits -->\nFrom `results/digits/fid_vs_steps.csv`")
    assert text.endswith("<!-- /results -->\nafter 4.56\n") and "old 9.99" not in text
    readme.write_text("<!-- results: nowhere -->\n<!-- /results -->\n")
    with pytest.raises(FastdiffError, match="'nowhere'"):
        update_readme(readme, tmp_path / "res")


def test_report_refuses_a_readme_block_without_its_results_before_writing(tmp_path, capsys):
    import shutil

    from fastdiff.errors import run_cli
    from fastdiff.report import main

    shutil.copytree(ROOT / "results" / "digits", tmp_path / "res" / "digits")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results: digits -->\n<!-- /results -->\n<!-- results: toy2d -->\n<!-- /results -->\n")
    before = sorted(p.name for p in (tmp_path / "res").rglob("*"))
    assert run_cli(main, [str(tmp_path / "res"), "--readme", str(readme)]) == 2
    assert "results blocks for toy2d" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "res").rglob("*")) == before and "From" not in readme.read_text()
