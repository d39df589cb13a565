"""tools.model.checkpoint: which checkpoint a swift run ends with, and the pointer test.sh reads."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, files_under, make_official, prepare_and_compose
from tools.fileio import DataError
from tools.model.checkpoint import finish, find_checkpoint, main, pointer_of, read_pointer, write_pointer
from tools.task import POINTER, TRAINED_ON, Layout


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
    assert pointer_of(run).read_text(encoding="utf-8") == "checkpoint-5\n"  # relative to the run folder
    assert read_pointer(run) == ckpt
    # a copied run folder reads its own checkpoint, not the original's
    import shutil
    shutil.copytree(run, tmp_path / "copy")
    assert read_pointer(tmp_path / "copy") == (tmp_path / "copy" / "checkpoint-5").resolve()
    shutil.rmtree(run)
    assert read_pointer(tmp_path / "copy") == (tmp_path / "copy" / "checkpoint-5").resolve()


def test_read_pointer_errors(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="final_checkpoint.txt not found: run train.sh first"):
        read_pointer(run)
    pointer_of(run).write_text("checkpoint-3\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"names .*run/checkpoint-3, which does not exist"):
        read_pointer(run)


@pytest.mark.parametrize("text", ["{outside}", "../other/checkpoint-3", "checkpoint-3/..", "checkpoint-3/../../other",
                                  "checkpoint-x", ".", ""])
def test_read_pointer_never_leads_outside_its_run_folder(tmp_path, text):
    """An absolute pointer (an older train.sh, or a copied output folder's) or one naming anything but a
    checkpoint-N folder of the run is refused, even when the folder it names exists."""
    run = make_run(tmp_path / "run", [3])
    other = make_run(tmp_path / "other", [3])
    pointer_of(run).write_text(text.format(outside=other / "checkpoint-3") + "\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="not a checkpoint-N folder of .*run: run train.sh again"):
        read_pointer(run)


def test_best_checkpoint_is_looked_up_by_name_in_the_run_folder(tmp_path):
    """trainer_state.json names the best with the path the run had while training (the work folder): after the
    swap, or in a copied output folder, the checkpoint of that name in the run folder is the one chosen."""
    run = make_run(tmp_path / "run", [2, 4], best=tmp_path / "run.training" / "checkpoint-2")
    assert find_checkpoint(run) == (run / "checkpoint-2").resolve()


def test_cli_exit_codes(tmp_path, capsys):
    out = tmp_path / "out"
    make_official(tmp_path / "data", n_per_label=2)
    prepare_and_compose(tmp_path / "data", out, "--val-ratio", "0.5")
    capsys.readouterr()
    layout = Layout(out)
    work, run = layout.run_work_dir("stage1"), layout.run_dir("stage1")
    make_run(work, [1, 3])
    assert main(["--latest", str(work)]) == 0
    assert capsys.readouterr().out.strip() == str((work / "checkpoint-3").resolve())
    assert main(["--finish", str(work), "--run-dir", str(run), "--output-dir", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "checkpoint-3")
    assert main(["--run-dir", str(run), "--read"]) == 0
    assert capsys.readouterr().out.strip() == str((run / "checkpoint-3").resolve())
    assert main(["--latest", str(tmp_path / "empty")]) == 0 and capsys.readouterr().out == ""  # nothing to resume
    assert main(["--finish", str(tmp_path / "empty"), "--run-dir", str(tmp_path / "r"), "--output-dir", str(out)]) == 1
    assert "no checkpoint-N folder" in capsys.readouterr().err
    assert main(["--run-dir", str(tmp_path / "empty"), "--read"]) == 1
    assert "not found: run train.sh first" in capsys.readouterr().err
    for argv in ([], ["--run-dir", str(run)], ["--finish", str(work)], ["--read", "--latest", str(work)]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    proc = subprocess.run([sys.executable, "-m", "tools.model.checkpoint", "--run-dir", str(run), "--read"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == str((run / "checkpoint-3").resolve())


# --------------------------------------------------------------------------- finish: the work folder replaces the run
def test_finish_swaps_in_the_work_folder_and_records_the_data(tmp_path):
    out = tmp_path / "out"
    make_official(tmp_path / "data", n_per_label=2)
    manifest = prepare_and_compose(tmp_path / "data", out, "--val-ratio", "0.5")
    layout = Layout(out)
    run, work = layout.run_dir("stage1"), layout.run_work_dir("stage1")
    assert work == out / "stage1.training" and layout.run_work_dir("stage2", 1) == out / "folds/1/stage2.training"
    make_run(run, [7])
    (run / "old_file").write_text("previous model")
    make_run(work, [2, 4], best=work / "checkpoint-2")
    assert finish(work, run, layout) == run / "checkpoint-2"
    assert not work.exists() and not (out / "stage1.old").exists()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "checkpoint-4", POINTER, TRAINED_ON]
    assert read_pointer(run) == (run / "checkpoint-2").resolve()
    assert json.loads(layout.trained_on("stage1").read_text(encoding="utf-8")) == {
        "fingerprint": manifest["fingerprint"]}


def test_finish_without_a_checkpoint_keeps_the_previous_model(tmp_path):
    out = tmp_path / "out"
    make_official(tmp_path / "data", n_per_label=2)
    prepare_and_compose(tmp_path / "data", out, "--val-ratio", "0.5")
    layout = Layout(out)
    run, work = layout.run_dir("stage1"), layout.run_work_dir("stage1")
    make_run(run, [7])
    write_pointer(run)
    before = files_under(run)
    work.mkdir()
    (work / "logging.jsonl").write_text("{}")  # swift ran, saved nothing (EPOCHS=0, a crash)
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder"):
        finish(work, run, layout)
    assert files_under(run) == before and read_pointer(run) == (run / "checkpoint-7").resolve()
    # the data changed since data-pre.sh: refused before anything moves
    make_run(work, [1])
    layout.val_jsonl("stage1").write_text("changed\n")
    with pytest.raises(DataError, match="changed since data-pre.sh finished"):
        finish(work, run, layout)
    assert files_under(run) == before and (work / "checkpoint-1").is_dir()
