"""tools.model.checkpoint: which checkpoint a swift run ends with, and the pointer test.sh reads."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, files_under, make_official, prepare_and_compose, relabel_first_line
from tools.fileio import DataError, read_json
from tools.model.checkpoint import find_checkpoint, finish, latest, main, pointer_of, read_pointer, start, write_pointer
from tools.state import check_data, run_fingerprint
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


def current_data(tmp_path):
    """An output folder data-pre.sh finished (2 images a label, half of them validating); returns its Layout."""
    out = tmp_path / "out"
    if not (tmp_path / "data").exists():
        make_official(tmp_path / "data", n_per_label=2)
    prepare_and_compose(tmp_path / "data", out, "--val-ratio", "0.5")
    return Layout(out)


def test_cli_exit_codes(tmp_path, capsys):
    layout = current_data(tmp_path)
    out = str(layout.root)
    capsys.readouterr()
    work, run = layout.run_work_dir("stage1"), layout.run_dir("stage1")
    assert main(["start", "--output-dir", out, "--stage", "stage1"]) == 0  # --run final by default
    assert capsys.readouterr().out.strip() == str(work) and (work / TRAINED_ON).exists()
    make_run(work, [1, 3])
    assert main(["latest", "--output-dir", out, "--stage", "stage1", "--run", "final"]) == 0
    assert capsys.readouterr().out.strip() == str((work / "checkpoint-3").resolve())
    assert main(["finish", "--output-dir", out, "--stage", "stage1"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "checkpoint-3")
    assert main(["read", "--output-dir", out, "--stage", "stage1"]) == 0
    assert capsys.readouterr().out.strip() == str((run / "checkpoint-3").resolve())
    assert main(["read", "--run-dir", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str((run / "checkpoint-3").resolve())
    # nothing to resume: no output, success
    assert main(["latest", "--output-dir", out, "--stage", "stage2"]) == 0 and capsys.readouterr().out == ""
    assert main(["start", "--output-dir", out, "--stage", "stage2"]) == 0  # swift then saves nothing
    capsys.readouterr()
    assert main(["finish", "--output-dir", out, "--stage", "stage2"]) == 1
    assert "no checkpoint-N folder" in capsys.readouterr().err
    assert main(["read", "--output-dir", out, "--stage", "stage2"]) == 1
    assert "not found: run train.sh first" in capsys.readouterr().err
    assert main(["finish", "--output-dir", out, "--stage", "stage1", "--run", "0"]) == 1  # never started
    assert "no record of what this run trained on" in capsys.readouterr().err
    for argv in ([], ["read"], ["latest", "--run-dir", str(run)], ["finish", "--output-dir", out], ["resume"],
                 ["start", "--output-dir", out, "--stage", "stage3"], ["--read", "--run-dir", str(run)]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
    proc = subprocess.run([sys.executable, "-m", "tools.model.checkpoint", "read", "--run-dir", str(run)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == str((run / "checkpoint-3").resolve())


# --------------------------------------------------------------------------- start, latest, finish: one run's life
def test_finish_swaps_in_the_work_folder_and_records_what_the_run_trained_on(tmp_path):
    layout = current_data(tmp_path)
    out = layout.root
    manifest = check_data(layout)
    run, work = layout.run_dir("stage1"), layout.run_work_dir("stage1")
    assert work == out / "stage1.training" and layout.run_work_dir("stage2", 1) == out / "folds/1/stage2.training"
    make_run(run, [7])
    (run / "old_file").write_text("previous model")
    assert start(layout, "stage1", "final") == work
    make_run(work, [2, 4], best=work / "checkpoint-2")
    assert finish(layout, "stage1", "final") == run / "checkpoint-2"
    assert not work.exists() and not (out / "stage1.old").exists()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "checkpoint-4", POINTER, TRAINED_ON]
    assert read_pointer(run) == (run / "checkpoint-2").resolve()
    # the run's own fingerprint (tools.state.run_fingerprint), not the whole data's
    recorded = json.loads(layout.trained_on("stage1").read_text(encoding="utf-8"))["fingerprint"]
    assert recorded == run_fingerprint(layout, manifest, "stage1", "final") != manifest["fingerprint"]


def retraining(tmp_path):
    """Stage 1 trained before (checkpoint-7, pointed at) and started again on current data: (layout, its run folder,
    its work folder, the run folder's files before)."""
    layout = current_data(tmp_path)
    run, work = layout.run_dir("stage1"), layout.run_work_dir("stage1")
    make_run(run, [7])
    write_pointer(run)
    before = files_under(run)
    start(layout, "stage1", "final")
    return layout, run, work, before


def test_finish_without_a_checkpoint_keeps_the_previous_model(tmp_path):
    layout, run, work, before = retraining(tmp_path)
    (work / "logging.jsonl").write_text("{}")  # swift ran, saved nothing (EPOCHS=0, a crash)
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder"):
        finish(layout, "stage1", "final")
    assert files_under(run) == before and read_pointer(run) == (run / "checkpoint-7").resolve()
    # a data file changed since data-pre.sh finished: refused before anything moves
    make_run(work, [1])
    layout.val_jsonl("stage1").write_text("changed\n")
    with pytest.raises(DataError, match="changed since data-pre.sh finished"):
        finish(layout, "stage1", "final")
    assert files_under(run) == before and (work / "checkpoint-1").is_dir()


def test_finish_refuses_a_run_whose_data_changed_while_it_trained(tmp_path):
    """data-pre.sh ran again while swift trained (no lock kept it out, or another output folder's copy): the run
    trained on the old rows, so it is not recorded as trained on the new ones; the previous model stays."""
    layout, run, work, before = retraining(tmp_path)
    make_run(work, [5])
    relabel_first_line(tmp_path / "data")
    current_data(tmp_path)  # data-pre.sh again, meanwhile
    with pytest.raises(DataError, match=rf"{work}: the data changed while this run trained \(data-pre.sh ran "
                                        r"meanwhile\?\): train again"):
        finish(layout, "stage1", "final")
    assert files_under(run) == before and (work / "checkpoint-5").is_dir()
    # a run whose own rows did not change finishes: a new test list is nothing stage 2 trains on
    start(layout, "stage2", "final")
    make_run(layout.run_work_dir("stage2"), [3])
    b = tmp_path / "data" / "B.txt"
    b.write_text("\n".join(b.read_text(encoding="utf-8").split()[:3]) + "\n", encoding="utf-8")
    current_data(tmp_path)
    assert finish(layout, "stage2", "final") == layout.run_dir("stage2") / "checkpoint-3"


def test_latest_continues_only_a_run_begun_on_the_current_data(tmp_path, capsys):
    """RESUME=1: the newest checkpoint of an unfinished run, if the run began on the current data and the base model
    this training uses; a work folder begun on other data or another model, or with no record of what it began on,
    is not continued (train.sh then starts afresh)."""
    layout = current_data(tmp_path)
    work = layout.run_work_dir("stage1")
    assert latest(layout, "stage1", "final") is None  # no work folder
    start(layout, "stage1", "final")
    assert latest(layout, "stage1", "final") is None  # begun, nothing saved yet
    make_run(work, [2, 10])
    assert latest(layout, "stage1", "final") == (work / "checkpoint-10").resolve()
    began_on = read_json(work / TRAINED_ON)["fingerprint"]["parts"]["model"]
    assert latest(layout, "stage1", "final", began_on) == (work / "checkpoint-10").resolve()
    assert latest(layout, "stage1", "final", "/models/another") is None  # RESUME=1 with another base model: afresh
    capsys.readouterr()
    assert main(["latest", "--output-dir", str(layout.root), "--stage", "stage1", "--model", "/models/another"]) == 0
    assert capsys.readouterr().out == ""
    relabel_first_line(tmp_path / "data")
    current_data(tmp_path)
    assert latest(layout, "stage1", "final") is None
    assert f"{work}: began on other data than the current (or unrecorded): not continued" in capsys.readouterr().err
    assert main(["latest", "--output-dir", str(layout.root), "--stage", "stage1"]) == 0
    assert capsys.readouterr().out == ""
    (work / TRAINED_ON).unlink()  # a work folder of an older train.sh: what it began on is unknown
    assert latest(layout, "stage1", "final") is None
