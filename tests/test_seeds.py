"""python -m fastdiff.seeds: one pipeline per teacher seed, and the spread of its FIDs."""
import pandas as pd
import pytest

from fastdiff.distill.cli import teacher_config
from fastdiff.distill.config import PRESETS, sweep_name
from fastdiff.errors import run_cli
from fastdiff.seeds import main, seed_config, spread


def test_a_teacher_seed_gets_its_own_teacher_run_and_results_but_the_same_data_split():
    base = PRESETS["digits"]
    zero, one = seed_config(base, 0), seed_config(base, 1)
    assert zero == base and sweep_name(zero) == "digits" and teacher_config(zero).out_dir == "runs/teacher-digits"
    t1 = teacher_config(one)
    assert (t1.seed, t1.split_seed, t1.out_dir) == (1, 0, "runs/teacher-digits-seed1")
    assert one.out_dir == "runs/distill-digits-tseed1" and sweep_name(one) == "digits-tseed1"
    assert one.seed == base.seed  # the distillation and the sweep's per-index noise stay the same


def _rows(seed, shift):
    rows = []
    for sampler, line, nfe, v in [("ddim", "ddim (linspace)", 4, 10.0), ("ddim", "ddim (linspace)", 64, 1.0),
                                  ("distilled", "students", 1, 2.0), ("distilled", "students", 4, 1.2)]:
        rows.append({"metric": "fid", "sampler": sampler, "line": line, "nfe": nfe, "value": v * shift})
    rows.append({"metric": "kid", "sampler": "ddim", "line": "ddim (linspace)", "nfe": 4, "value": 9.0})
    return pd.DataFrame(rows)


def test_spread_puts_every_seed_beside_each_other_with_its_own_teacher_best():
    table = spread({0: _rows(0, 1.0), 1: _rows(1, 1.5)}).set_index(["sampler", "nfe"])
    assert table.loc[("ddim", 4), "fid_seed0"] == 10.0 and table.loc[("ddim", 4), "fid_seed1"] == 15.0
    assert table.loc[("ddim", 4), "fid_max_over_min"] == pytest.approx(1.5)
    assert table.loc[("distilled", 1), "vs_teacher_best_seed0"] == pytest.approx(2.0)  # 2.0 / 1.0
    assert table.loc[("distilled", 1), "vs_teacher_best_seed1"] == pytest.approx(2.0)  # 3.0 / 1.5
    assert len(table) == 4  # the KID row is not a FID


def test_bad_seeds_exit_2_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv, msg in ((["--teacher-seeds", "0"], "at least two distinct"), (["--teacher-seeds", "a,b"], "cannot read"),
                      ([], "pass --teacher-seeds"), (["--teacher-seeds", "0,1", "--teacher", "x"], "one per seed"),
                      (["--teacher-seeds", "0,1", "--bench", "false"], "needs the sweep")):
        assert run_cli(main, argv) == 2
        assert msg in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_help_and_dry_run_write_nothing(tmp_path, capsys, monkeypatch):
    """Found by a new user's trial: --dry-run was ignored and training started; --help was an error."""
    monkeypatch.chdir(tmp_path)
    assert run_cli(main, ["--help"]) == 0 and "--teacher-seeds S1,S2" in capsys.readouterr().out
    assert run_cli(main, ["--teacher-seeds=0,1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "teacher seed 1:" in out and "runs/distill-digits-tseed1" in out and "digits-seeds.csv" in out
    assert list(tmp_path.iterdir()) == []
