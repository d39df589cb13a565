"""Issue 13's reproductions as tests: the state between data-pre.sh, train.sh and test.sh. The scripts run for real
with the fake swift and scorer (tests/helpers.py) on tiny official-layout data: stale models are refused (and
ALLOW_STALE=1 overrides), a half-written data step is detected, one script holds an output folder at a time, a
failed training never costs the previous model, recorded settings round-trip any value, and RESUME=1 continues."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path


from tests.helpers import (ROOT, fake_model, fake_trained, flag, make_official, prepare, prepared, relabel_first_line,
                           run_data_pre, run_script, score_calls, script_env, swift_calls, tree_state, value)
from tools.demo.data import make_dataset
from tools.fileio import read_json
from tools.state import check_data, run_fingerprint, stale_models
from tools.task import STAGES, TRAINED_ON, Layout


def runs_state(layout: Layout) -> dict:
    """Every file of both final run folders (bytes and times)."""
    return {stage: tree_state(layout.run_dir(stage)) for stage in STAGES}


def checkpoints_scored(tmp_path: Path) -> list[str]:
    (call,) = score_calls(tmp_path)
    return [ckpt for ckpt, _ in call["jobs"]]


# --------------------------------------------------------------------------- stale models
def test_test_sh_refuses_models_trained_on_other_data(tmp_path):
    """data-pre.sh again after relabelling a training line, or on another DATA_DIR, into the same output folder:
    test.sh refuses the old models and says what changed; ALLOW_STALE=1 scores with them and warns."""
    data, out = make_official(tmp_path / "data", n_per_label=6), tmp_path / "out"
    env = {"DATA_DIR": str(data), "OUTPUT_DIR": str(out), "AUGMENT": "0", "VAL_RATIO": "0.25",
           "MODEL_STAGE1": str(fake_model(tmp_path / "m1")), "MODEL_STAGE2": str(fake_model(tmp_path / "m2"))}
    layout = Layout(out)
    run_data_pre(env)
    run_script("train.sh", tmp_path, out)
    run_script("test.sh", tmp_path, out)
    score_calls(tmp_path)
    submission = layout.submission.read_bytes()

    relabel_first_line(data)
    run_data_pre(env)
    log = run_script("test.sh", tmp_path, out, rc=1)
    for stage in STAGES:
        assert f"{stage} was trained on other data than data-pre.sh prepared since: " in log
    assert "its training rows" in log and "train_rows" in log
    assert "retrain (bash train.sh), or set ALLOW_STALE=1 to use them anyway" in log
    assert score_calls(tmp_path) == [] and layout.submission.read_bytes() == submission  # nothing scored or written

    log = run_script("test.sh", tmp_path, out, ALLOW_STALE="1")
    assert "warning: stage1 was trained on other data than data-pre.sh prepared since" in log
    assert "(ALLOW_STALE=1: used anyway)" in log and len(score_calls(tmp_path)) == 1

    other = make_official(tmp_path / "other data", n_per_label=5)  # another DATA_DIR
    run_data_pre({**env, "DATA_DIR": str(other)})
    log = run_script("test.sh", tmp_path, out, rc=1)
    assert ("the training images, its training rows (the split, the stage-set settings or the augmented copies), "
            "the validation rows changed (train_images, train_rows, val_rows)") in log
    assert "test_images" not in log  # new test images too, but no model trained on them
    assert score_calls(tmp_path) == []

    run_script("train.sh", tmp_path, out)  # retrained: no override needed
    assert "warning" not in run_script("test.sh", tmp_path, out)


def test_retraining_one_stage_refuses_a_stale_other_stage(tmp_path):
    """STAGES=stage2 bash train.sh after new data: stage 1 would stay trained on the old data, so train.sh stops
    before any training (ALLOW_STALE=1: trains stage 2 and keeps stage 1 with a warning)."""
    out, layout = prepared(tmp_path)
    run_script("train.sh", tmp_path, out)
    swift_calls(tmp_path)
    relabel_first_line(tmp_path / "data")
    prepared(tmp_path, out)
    before = runs_state(layout)
    start = time.monotonic()
    log = run_script("train.sh", tmp_path, out, rc=1, STAGES="stage2")
    assert time.monotonic() - start < 60
    assert "stage1 was trained on other data than data-pre.sh prepared since: " in log
    assert "its training rows" in log
    assert "retrain (bash train.sh), or set ALLOW_STALE=1" in log and "stage2 was trained" not in log
    assert swift_calls(tmp_path) == [] and runs_state(layout) == before

    log = run_script("train.sh", tmp_path, out, STAGES="stage2", ALLOW_STALE="1")
    assert "warning: stage1 was trained on other data" in log
    assert [value(a, "--output_dir") for a in swift_calls(tmp_path)] == [str(layout.run_work_dir("stage2"))]
    manifest = check_data(layout)
    assert stale_models(layout, manifest, ["stage2"], ["final"]) == []
    assert len(stale_models(layout, manifest, ["stage1"], ["final"])) == 1


def test_a_copied_output_folder_scores_with_its_own_checkpoints(tmp_path):
    out1, layout1 = prepared(tmp_path, tmp_path / "out1")
    run_script("train.sh", tmp_path, out1)
    out2 = tmp_path / "out2"
    subprocess.run(["cp", "-a", str(out1), str(out2)], check=True)
    run_script("test.sh", tmp_path, out2)
    used = checkpoints_scored(tmp_path)
    assert used == [str((out2 / s / "checkpoint-1").resolve()) for s in STAGES]
    shutil.rmtree(out1)  # the original gone: the copy does not need it
    run_script("test.sh", tmp_path, out2)
    assert checkpoints_scored(tmp_path) == used and Layout(out2).submission.exists()


def test_a_pointer_leading_outside_its_run_folder_is_refused(tmp_path):
    out, layout = prepared(tmp_path)
    run_script("train.sh", tmp_path, out)
    other = tmp_path / "elsewhere" / "checkpoint-1"
    other.mkdir(parents=True)
    for text in (str(other), "../stage2/checkpoint-1", "../../elsewhere/checkpoint-1"):  # an old absolute pointer too
        layout.checkpoint_pointer("stage1").write_text(text + "\n", encoding="utf-8")
        log = run_script("test.sh", tmp_path, out, rc=1)
        assert f"final_checkpoint.txt names {text!r}, not a checkpoint-N folder of {layout.run_dir('stage1')}" in log
        assert "run train.sh again" in log and not layout.submission.exists()


def test_a_rebuilt_demo_with_the_same_seed_is_not_new_data(tmp_path):
    """The demo build writes files named by their md5: a rebuild with the same seed leaves every image as it was
    (same bytes, same times), so the models trained on it stay current; another seed is new data."""
    demo = make_dataset(tmp_path / "demo", seed=0, n_train=40, n_test=8, workers=1)
    images = {p: p.stat().st_mtime_ns for p in sorted((demo / "train").iterdir()) + sorted((demo / "B").iterdir())}
    out, layout = prepared(tmp_path, None, data=demo)
    fake_trained(layout)
    time.sleep(0.05)
    make_dataset(demo, seed=0, n_train=40, n_test=8, workers=1)
    assert {p: p.stat().st_mtime_ns for p in images} == images
    prepared(tmp_path, out, data=demo)
    manifest = check_data(layout)
    assert stale_models(layout, manifest, STAGES, ["final"]) == []
    run_script("test.sh", tmp_path, out)

    make_dataset(demo, seed=1, n_train=40, n_test=8, workers=1)
    prepared(tmp_path, out, data=demo)
    assert len(stale_models(layout, check_data(layout), STAGES, ["final"])) == 2


# --------------------------------------------------------------------------- half-written steps
def test_data_changed_after_the_manifest_is_refused_by_train_and_test(tmp_path):
    """data-pre.sh interrupted after its first step (a new split beside the old stage sets and manifest), or after
    one stage set: train.sh and test.sh refuse the mix before any work and say what to do."""
    out, layout = prepared(tmp_path)
    fake_trained(layout)
    before = runs_state(layout)
    prepare(tmp_path / "data", out, "--val-ratio", "0.25", "--seed", "9")  # step 1 of a new run, then Ctrl-C
    for script in ("train.sh", "test.sh"):
        log = run_script(script, tmp_path, out, rc=1)
        assert "changed since data-pre.sh finished" in log and str(layout.manifest) in log
        assert "data-pre.sh was interrupted or is running now; run it again" in log
    assert swift_calls(tmp_path) == [] and score_calls(tmp_path) == [] and runs_state(layout) == before

    prepared(tmp_path, out)  # data-pre.sh to the end: consistent again (and the models current: same settings)
    run_script("test.sh", tmp_path, out)
    score_calls(tmp_path)
    rows = layout.train_jsonl("stage1").read_text(encoding="utf-8").splitlines()
    layout.train_jsonl("stage1").write_text("\n".join(rows[:-1]) + "\n", encoding="utf-8")  # a new first JSONL
    for script in ("train.sh", "test.sh"):
        log = run_script(script, tmp_path, out, rc=1)
        assert f"{layout.train_jsonl('stage1')}: changed since data-pre.sh finished" in log
    assert swift_calls(tmp_path) == [] and score_calls(tmp_path) == []


# --------------------------------------------------------------------------- one script per output folder
def hold_lock(layout: Layout, holder: str):
    """Take the output folder's lock as a script would (flock on Layout.lock_file) and name the holder."""
    layout.root.mkdir(parents=True, exist_ok=True)
    f = open(layout.lock_file, "a")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    layout.lock_owner.write_text(holder + "\n", encoding="utf-8")
    return f


def test_a_script_stops_at_once_when_another_holds_the_output_folder(tmp_path):
    out, layout = prepared(tmp_path)
    fake_trained(layout)
    data_before = tree_state(layout.data_dir)
    env = {"DATA_DIR": str(tmp_path / "data"), "AUGMENT": "0", "VAL_RATIO": "0.25",
           "MODEL_STAGE1": str(tmp_path / "m1"), "MODEL_STAGE2": str(tmp_path / "m2")}
    lock = hold_lock(layout, "test.sh, pid 4242, since 2026-12-01 10:00:00")
    try:
        for script in ("data-pre.sh", "train.sh", "test.sh"):
            start = time.monotonic()
            log = run_script(script, tmp_path, out, rc=1, **env)
            assert time.monotonic() - start < 60, script  # at once: no image check, no training, no scoring
            assert (f"{out} is in use by test.sh, pid 4242, since 2026-12-01 10:00:00: one script per output folder"
                    in log), script
        assert swift_calls(tmp_path) == [] and score_calls(tmp_path) == []
        assert tree_state(layout.data_dir) == data_before and not layout.submission.exists()
    finally:
        lock.close()
    run_script("test.sh", tmp_path, out)  # released: the next script runs
    assert layout.submission.exists()


def test_test_sh_while_train_sh_runs(tmp_path):
    """The lock is held by the running script and its children (swift), and the message names it."""
    out, layout = prepared(tmp_path)
    fake_trained(layout)
    wait = tmp_path / "swift-waits"
    wait.touch()
    train = subprocess.Popen(["bash", str(ROOT / "train.sh")], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env=script_env(tmp_path, out, FAKE_SWIFT_WAIT=str(wait)))
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "swift_calls.txt").exists():  # swift started: train.sh holds the lock
            assert train.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        log = run_script("test.sh", tmp_path, out, rc=1)
        assert f"{out} is in use by train.sh, pid {train.pid}, since " in log
        assert score_calls(tmp_path) == []
    finally:
        wait.unlink()
        log, _ = train.communicate(timeout=120)
    assert train.returncode == 0, log
    run_script("test.sh", tmp_path, out)


# --------------------------------------------------------------------------- the last good model survives
def test_a_failing_swift_leaves_the_previous_model(tmp_path):
    out, layout = prepared(tmp_path)
    run_script("train.sh", tmp_path, out)
    swift_calls(tmp_path)
    before = runs_state(layout)
    # swift crashes before saving, or exits 0 having saved nothing (the EPOCHS=0 reproduction): both fail
    saved_nothing = "no checkpoint-N folder (did training finish? swift saved nothing)"
    for env, message in (({"FAKE_SWIFT_RC": "1", "FAKE_SWIFT_SAVE": "0"}, None),
                         ({"FAKE_SWIFT_SAVE": "0"}, saved_nothing)):
        log = run_script("train.sh", tmp_path, out, rc=1, **env)
        assert "next: bash test.sh" not in log and "stage1 checkpoint:" not in log
        assert message is None or message in log
        assert len(swift_calls(tmp_path)) == 1  # stopped at stage 1
        assert runs_state(layout) == before
    # stage 1 retrained, stage 2 fails: stage 1 is the new model, stage 2 the previous one
    log = run_script("train.sh", tmp_path, out, rc=1, FAKE_SWIFT_FOR="stage2", FAKE_SWIFT_SAVE="0", FAKE_SWIFT_STEP="2")
    assert "stage1 checkpoint: " in log and "next: bash test.sh" not in log
    assert (layout.run_dir("stage1") / "checkpoint-2").is_dir()
    assert tree_state(layout.run_dir("stage2")) == before["stage2"]
    run_script("test.sh", tmp_path, out)  # what is there still scores
    assert checkpoints_scored(tmp_path) == [str((out / "stage1/checkpoint-2").resolve()),
                                            str((out / "stage2/checkpoint-1").resolve())]


def test_a_typo_in_stages_or_zero_epochs_touches_nothing(tmp_path):
    out, layout = prepared(tmp_path)
    run_script("train.sh", tmp_path, out)
    swift_calls(tmp_path)
    before = tree_state(out)
    for env, message in (({"STAGES": "stage1 stgae2"}, "STAGES='stage1 stgae2': expected stage1, stage2 or both"),
                         ({"EPOCHS_STAGE1": "0"}, "EPOCHS_STAGE1='0': expected a number > 0"),
                         ({"STAGES": "stage1", "RUNS": "final fold"}, "RUNS='final fold': expected folds, final")):
        log = run_script("train.sh", tmp_path, out, rc=1, **env)
        assert message in log and swift_calls(tmp_path) == []
        assert tree_state(out) == before  # the previous models, their pointers, the data: all as they were


# --------------------------------------------------------------------------- recorded settings round-trip
def test_recorded_settings_round_trip_any_value(tmp_path):
    """A data path, model folders and an output folder with spaces, quotes, `$(touch /tmp/pwned-…)` and non-ASCII
    reach swift and the submission check exactly, and nothing in them runs."""
    pwned = f"/tmp/pwned-{uuid.uuid4().hex}"
    assert not os.path.exists(pwned)
    command = f"$(touch {pwned})"  # a path: one folder per slash
    data = make_official(tmp_path / "my ele's \"data\" $HOME `id`" / f"x {command} 数据", n_per_label=6)
    model1 = fake_model(tmp_path / "models 'q'" / f"7b {command} 模型")
    model2 = fake_model(tmp_path / 'models "dq" $(id)' / "3b\ttab 模型")
    out = tmp_path / "out 'o' \"p\" $(id) 出力"
    layout = Layout(out)
    assert command in str(data) and command in str(model1)
    run_data_pre({"DATA_DIR": str(data), "OUTPUT_DIR": str(out), "AUGMENT": "0", "VAL_RATIO": "0.25",
                  "MODEL_STAGE1": str(model1), "MODEL_STAGE2": str(model2)})
    settings = read_json(layout.manifest)["settings"]
    assert settings["model_stage1"] == str(model1) and settings["model_stage2"] == str(model2)
    assert settings["test_list"] == str(data / "B.txt")
    run_script("train.sh", tmp_path, out)
    stage1, stage2 = swift_calls(tmp_path)
    assert value(stage1, "--model") == str(model1) and value(stage2, "--model") == str(model2)
    assert value(stage1, "--dataset") == str(layout.train_jsonl("stage1"))
    assert value(stage2, "--output_dir") == str(layout.run_work_dir("stage2"))
    log = run_script("test.sh", tmp_path, out)
    assert "OK: 5 images" in log  # validated against the recorded test list, found at its exact path
    assert [line.split("\t")[0] for line in layout.submission.read_text(encoding="utf-8").splitlines()] == [
        f"t{i}.jpg" for i in range(5)]
    assert not os.path.exists(pwned) and not (ROOT / "pwned").exists()


# --------------------------------------------------------------------------- RESUME=1
def interrupted_retrain(tmp_path: Path, out: Path, stage: str = "stage1") -> Path:
    """train.sh again, interrupted in `stage` after swift saved checkpoint-4 (Ctrl-C: exit 130); returns the work
    folder it leaves (with an older checkpoint-2 too)."""
    log = run_script("train.sh", tmp_path, out, rc=130, FAKE_SWIFT_FOR=f"/{stage}.", FAKE_SWIFT_STEP="4",
                     FAKE_SWIFT_RC="130")
    assert "next: bash test.sh" not in log
    layout = Layout(out)
    work = layout.run_work_dir(stage)
    (work / "checkpoint-2").mkdir()
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-2", "checkpoint-4", TRAINED_ON]
    # recorded before swift started: what the run trains on (tools.model.checkpoint start)
    assert read_json(work / TRAINED_ON)["fingerprint"] == run_fingerprint(layout, check_data(layout), stage, "final")
    swift_calls(tmp_path)
    return work


def test_resume_continues_an_unfinished_run_and_keeps_finished_ones(tmp_path):
    out, layout = prepared(tmp_path)
    run_script("train.sh", tmp_path, out)
    swift_calls(tmp_path)
    stage2_before = tree_state(layout.run_dir("stage2"))
    stage1_before = tree_state(layout.run_dir("stage1"))
    work = interrupted_retrain(tmp_path, out)
    assert tree_state(layout.run_dir("stage1")) == stage1_before  # interrupted: the previous model stays

    log = run_script("train.sh", tmp_path, out, RESUME="1", FAKE_SWIFT_STEP="6")
    (call,) = swift_calls(tmp_path)  # stage 2 finished on the current data: kept, swift not called for it
    assert value(call, "--output_dir") == str(work)
    assert flag(call, "--resume_from_checkpoint") == [str((work / "checkpoint-4").resolve())]
    assert f"stage1: continuing from {(work / 'checkpoint-4').resolve()} (RESUME=1)" in log
    assert "stage2: trained on the current data, kept (RESUME=1)" in log
    assert stale_models(layout, check_data(layout), STAGES, ["final"]) == []
    assert (layout.checkpoint_pointer("stage1")).read_text(encoding="utf-8") == "checkpoint-6\n"
    assert not work.exists() and tree_state(layout.run_dir("stage2")) == stage2_before

    before = tree_state(out)  # everything finished and current: RESUME=1 does nothing
    log = run_script("train.sh", tmp_path, out, RESUME="1")
    assert swift_calls(tmp_path) == [] and "stage1: trained on the current data, kept (RESUME=1)" in log
    assert {k: v for k, v in tree_state(out).items() if not k.startswith(".lock")} == {
        k: v for k, v in before.items() if not k.startswith(".lock")}


def test_resume_retrains_a_stale_finished_run(tmp_path):
    out, layout = prepared(tmp_path)
    run_script("train.sh", tmp_path, out)
    swift_calls(tmp_path)
    relabel_first_line(tmp_path / "data")
    prepared(tmp_path, out)
    run_script("train.sh", tmp_path, out, RESUME="1")
    calls = swift_calls(tmp_path)
    assert [value(a, "--output_dir") for a in calls] == [str(layout.run_work_dir(s)) for s in STAGES]
    assert all(flag(a, "--resume_from_checkpoint") == [] for a in calls)
    assert stale_models(layout, check_data(layout), STAGES, ["final"]) == []


def test_without_resume_an_unfinished_run_starts_afresh(tmp_path):
    out, layout = prepared(tmp_path)
    run_script("train.sh", tmp_path, out)
    swift_calls(tmp_path)
    interrupted_retrain(tmp_path, out)
    run_script("train.sh", tmp_path, out)
    calls = swift_calls(tmp_path)
    assert len(calls) == 2 and all(flag(a, "--resume_from_checkpoint") == [] for a in calls)
    assert sorted(p.name for p in layout.run_dir("stage1").glob("checkpoint-*")) == ["checkpoint-1"]


def test_resume_does_not_continue_a_run_begun_on_other_data(tmp_path):
    out, layout = prepared(tmp_path)
    run_script("train.sh", tmp_path, out)
    swift_calls(tmp_path)
    work = interrupted_retrain(tmp_path, out)  # begun on the current data...
    relabel_first_line(tmp_path / "data")
    prepared(tmp_path, out)  # ...which data-pre.sh then replaced
    log = run_script("train.sh", tmp_path, out, RESUME="1")
    calls = swift_calls(tmp_path)
    assert [value(a, "--output_dir") for a in calls] == [str(layout.run_work_dir(s)) for s in STAGES]
    assert all(flag(a, "--resume_from_checkpoint") == [] for a in calls)  # stage 1 starts afresh on the new data
    assert f"{work}: began on other data than the current (or unrecorded): not continued" in log
    assert sorted(p.name for p in layout.run_dir("stage1").glob("checkpoint-*")) == ["checkpoint-1"]  # no old one
    assert stale_models(layout, check_data(layout), STAGES, ["final"]) == []
