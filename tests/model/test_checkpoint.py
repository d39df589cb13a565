"""tools.model.checkpoint: which checkpoint a swift run ends with, and the pointer test.sh reads."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tools.model.checkpoint import find_checkpoint, main, pointer_of, read_pointer, write_pointer
from tools.task import Layout


def make_run(run_dir, steps, best=None, state_in=None):
    """checkpoint-<step> folders; trainer_state.json (with best_model_checkpoint) in `state_in` (default: the last)."""
    for step in steps:
        (run_dir / f"checkpoint-{step}").mkdir(parents=True)
    if best is not None:
        state = run_dir / f"checkpoint-{state_in or steps[-1]}" / "trainer_state.json"
        state.write_text(json.dumps({"best_model_checkpoint": str(best), "best_metric": 1.0}), encoding="utf-8")
    return run_dir


def test_newest_checkpoint_in_numeric_order(tmp_path):
    run = make_run(tmp_path / "run", [2, 9, 10, 1])
    assert find_checkpoint(run) == (run / "checkpoint-10").resolve()  # 10 > 9, not "10" < "9"
    for name in ("checkpoint-99-old", "checkpoint-x", "checkpoint-", "ckpt-500", "checkpoint-200.tmp"):
        (run / name).mkdir()
    assert find_checkpoint(run) == (run / "checkpoint-10").resolve()  # other names ignored


def test_best_checkpoint_wins_when_it_exists(tmp_path):
    run = tmp_path / "run"
    make_run(run, [2, 4, 6], best=run / "checkpoint-4")
    assert find_checkpoint(run) == (run / "checkpoint-4").resolve()
    # a best checkpoint that was deleted since (save_total_limit): the newest one
    other = make_run(tmp_path / "other", [2, 4], best=tmp_path / "other" / "checkpoint-1")
    assert find_checkpoint(other) == (other / "checkpoint-4").resolve()
    # no best recorded (no evaluation): the newest one
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "checkpoint-3").mkdir()
    (tmp_path / "plain" / "checkpoint-3" / "trainer_state.json").write_text('{"best_model_checkpoint": null}')
    assert find_checkpoint(tmp_path / "plain") == (tmp_path / "plain" / "checkpoint-3").resolve()


def test_no_checkpoint_is_an_error(tmp_path):
    (tmp_path / "run" / "checkpoint-final").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder"):
        find_checkpoint(tmp_path / "run")
    with pytest.raises(FileNotFoundError):
        find_checkpoint(tmp_path / "missing")


def test_pointer_round_trip(tmp_path):
    run = make_run(tmp_path / "run", [5, 10], best=tmp_path / "run" / "checkpoint-5")
    ckpt = write_pointer(run)
    assert ckpt == (run / "checkpoint-5").resolve()
    assert pointer_of(run) == run / "final_checkpoint.txt" == Layout(tmp_path).checkpoint_pointer("run")
    assert pointer_of(run).read_text(encoding="utf-8") == f"{ckpt}\n"
    assert read_pointer(run) == ckpt


def test_read_pointer_errors(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="final_checkpoint.txt not found: run train.sh first"):
        read_pointer(run)
    pointer_of(run).write_text(f"{tmp_path / 'gone' / 'checkpoint-3'}\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"names .*gone/checkpoint-3, which does not exist"):
        read_pointer(run)


def test_cli_exit_codes(tmp_path, capsys):
    run = make_run(tmp_path / "run", [1, 3])
    assert main(["--run-dir", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str((run / "checkpoint-3").resolve())
    assert main(["--run-dir", str(run), "--read"]) == 0
    assert capsys.readouterr().out.strip() == str((run / "checkpoint-3").resolve())
    assert main(["--run-dir", str(tmp_path / "empty")]) == 1
    assert "no checkpoint-N folder" in capsys.readouterr().err
    assert main(["--run-dir", str(tmp_path / "empty"), "--read"]) == 1
    assert "not found: run train.sh first" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    proc = subprocess.run([sys.executable, "-m", "tools.model.checkpoint", "--run-dir", str(run), "--read"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == str((run / "checkpoint-3").resolve())
