"""python -m fastdiff.margin: two teachers of different seeds, the KID between their samples as the margin δ, and the
report's answer reading it."""
from __future__ import annotations

import json

import pytest

from fastdiff.errors import FastdiffError
from fastdiff.margin import main
from test_metrics import one_thread, shared_cache  # noqa: F401  (fixtures: one classifier cache, one CPU thread)


@pytest.mark.slow
def test_margin_is_the_kid_between_two_teachers_and_is_written_beside_the_sweep(tmp_path, monkeypatch, shared_cache,
                                                                                capsys):
    monkeypatch.chdir(tmp_path)  # the preset's teacher run dirs (runs/teacher-digits, -seed1) go here
    argv = ["--teacher-seed", "1", "--teacher-updates", "2", "--bench-teacher-samples", "24", "--results-dir", "res",
            "--device", "cpu"]
    assert main(argv) == 0
    record = json.loads((tmp_path / "res" / "digits" / "margin.json").read_text())
    assert "margin delta = " in capsys.readouterr().out
    lo, hi = record["delta_interval_95"]
    assert lo < record["delta"] < hi and record["metric"] == "kid" and record["samples_per_teacher"] == 24
    assert set(record["teachers"]) == {"0", "1"} and len(set(record["teachers"].values())) == 2
    assert record["teacher_references"] == ["teacher-ddim-linspace-64-n24-seed4294967296",
                                            "teacher-ddim-linspace-64-n24-seed4294967297"]  # independent noise
    assert set(record["held_out_kid"]) == {"reference", *record["teachers"].values()}
    assert record["held_out_kid"]["reference"] == "digits-test-n360"  # held out
    assert (tmp_path / "runs" / "teacher-digits-seed1" / "checkpoint.pt").is_file()
    # again: both teachers and both sample sets are reused (cached), the same delta
    assert main(argv) == 0
    assert json.loads((tmp_path / "res" / "digits" / "margin.json").read_text())["delta"] == record["delta"]


@pytest.mark.parametrize("argv, match", [(["--teacher-seed", "0"], "a seed other than the preset teacher's"),
                                         ([], "a seed other than"),
                                         (["--teacher-seed", "1", "--teacher", "x"], "--teacher names one")])
def test_margin_refuses_bad_input_in_one_line(argv, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FastdiffError, match=match):
        main(argv + ["--results-dir", "res"])
    assert list(tmp_path.iterdir()) == []
