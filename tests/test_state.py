"""tools.state: the state between the scripts (issue 13). data-pre.sh's outputs are whole (every file's digest
matches the manifest, written last), each model records the data fingerprint it trained on and a mismatch says
what changed, and the recorded settings reach the scripts as plain NUL-separated values."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, compose, fake_trained, prepare, prepared, relabel_first_line
from tools import state as T
from tools.fileio import DataError
from tools.task import STAGES


def test_digests_and_fingerprint(tmp_path):
    assert T.digest("abc") == T.digest(b"abc") != T.digest("abd")
    (tmp_path / "f").write_bytes(b"x" * 3_000_000)  # more than one block
    import hashlib

    assert T.file_digest(tmp_path / "f") == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    image = tmp_path / "f"
    before = T.images_digest([image, tmp_path / "missing"])
    assert T.images_digest([image, tmp_path / "missing"]) == before
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched: a new time is new data
    assert T.images_digest([image, tmp_path / "missing"]) != before
    a = T.fingerprint({"b": "2", "a": "1"})
    assert list(a["parts"]) == ["a", "b"] and a == T.fingerprint({"a": "1", "b": "2"})
    b = T.fingerprint({"a": "1", "b": "3", "c": "4"})
    assert a["digest"] != b["digest"] and T.changed_parts(a, b) == ["b", "c"]
    assert T.changed_parts({"digest": "x"}, a) == ["a", "b"] and T.changed_parts({}, {}) == ["(unknown)"]
    assert T.describe(["train_list", "model_stage1", "new_part"]) == (
        "the training list or its labels, MODEL_STAGE1, new_part")


def test_check_data_refuses_missing_old_and_changed_files(tmp_path):
    out, layout = prepared(tmp_path)
    manifest = T.check_data(layout)
    assert manifest["fingerprint"] and manifest["files"]
    # a data file changed after the manifest: data-pre.sh interrupted after it, or running now
    original = layout.val_jsonl("stage2").read_bytes()
    layout.val_jsonl("stage2").write_bytes(original + b"\n")
    with pytest.raises(DataError, match=rf"{layout.val_jsonl('stage2')}: changed since data-pre.sh finished "
                                        rf"\({layout.manifest}\): data-pre.sh was interrupted or is running now; "
                                        "run it again"):
        T.check_data(layout)
    layout.val_jsonl("stage2").write_bytes(original)
    T.check_data(layout)
    layout.test_jsonl.unlink()
    with pytest.raises(DataError, match=r"test.jsonl: missing since data-pre.sh finished"):
        T.check_data(layout)
    # the split step of a new data-pre.sh run finished, the rest did not: the new split beside the old manifest
    prepare(tmp_path / "data", out, "--val-ratio", "0.25", "--seed", "5")
    with pytest.raises(DataError, match=r"data/split/.*: changed since data-pre.sh finished"):
        T.check_data(layout)
    # a manifest of the version before issue 13 (no digests): data-pre.sh again
    layout.manifest.write_text(json.dumps({"folds": 1}), encoding="utf-8")
    with pytest.raises(DataError, match="written by an older version of this project: run data-pre.sh again"):
        T.check_data(layout)
    layout.manifest.unlink()
    with pytest.raises(DataError, match=r"manifest.json: not found: run data-pre.sh first \(or again, if it was "
                                        r"interrupted\)"):
        T.check_data(layout)


def test_stale_models_say_which_model_and_what_changed(tmp_path):
    out, layout = prepared(tmp_path, None, "--folds", "2")
    manifest = T.check_data(layout)
    assert T.stale_models(layout, manifest, STAGES, T.runs_of(manifest, ["folds", "final"])) == [
        f"fold 0's stage1 ({layout.run_dir('stage1', 0)}): no trained model recorded; run train.sh (its fold runs)",
        f"fold 0's stage2 ({layout.run_dir('stage2', 0)}): no trained model recorded; run train.sh (its fold runs)",
        f"fold 1's stage1 ({layout.run_dir('stage1', 1)}): no trained model recorded; run train.sh (its fold runs)",
        f"fold 1's stage2 ({layout.run_dir('stage2', 1)}): no trained model recorded; run train.sh (its fold runs)",
        f"stage1 ({layout.run_dir('stage1')}): no trained model recorded; run train.sh",
        f"stage2 ({layout.run_dir('stage2')}): no trained model recorded; run train.sh"]
    fake_trained(layout, 2)
    assert T.stale_models(layout, manifest, STAGES, T.runs_of(manifest, ["folds", "final"])) == []
    # relabel one training line (a 高风险 image) and prepare again: every model is stale, and the message says why
    relabel_first_line(tmp_path / "data")
    prepared(tmp_path, out, "--folds", "2")
    new = T.check_data(layout)
    found = T.stale_models(layout, new, ["stage2"], [1, "final"])
    assert [line.split(" was ")[0] for line in found] == ["fold 1's stage2", "stage2"]
    for line in found:  # each run is judged by what it trains on: its rows (tools.state.run_fingerprint)
        assert line.startswith(f"{line.split(' was ')[0]} was trained on other data than data-pre.sh prepared since: ")
        assert "its training rows" in line and "train_rows" in line


def test_runs_of():
    assert T.runs_of({"folds": 3}, ["folds", "final"]) == [0, 1, 2, "final"]
    assert T.runs_of({"folds": 1}, ["folds", "final"]) == ["final"]
    assert T.runs_of({"folds": 3}, ["2"]) == [2]
    for bad in (["3"], ["all"], ["-1"]):
        with pytest.raises(DataError, match="RUNS: unknown run"):
            T.runs_of({"folds": 3}, bad)


def run_state(out, *argv):
    return subprocess.run([sys.executable, "-m", "tools.state", "--output-dir", str(out), *argv], cwd=ROOT,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_settings_are_plain_nul_separated_values(tmp_path):
    odd = tmp_path / "my ele's \"data\" $(touch pwned) `id` 数据"
    odd_model = "/models/a b/'c' \"d\" $HOME 模型\\n\ttab"
    out, _ = prepared(tmp_path, None, data=odd, recipe="real")
    compose(out, "--recipe", "real", "--model-stage1", odd_model)
    proc = run_state(out, "settings")
    assert proc.returncode == 0, proc.stderr
    values = proc.stdout.split(b"\0")
    assert values[-1] == b"" and len(values) == len(T.SETTINGS) + 1
    assert [v.decode("utf-8") for v in values[:-1]] == ["real", odd_model, "/m2", str(odd / "B.txt"), "0", "1", "five"]
    # what bash's `read -r -d ''` makes of them (as train.sh and test.sh read them): the same strings, nothing run
    script = ('{ IFS= read -r -d "" a && IFS= read -r -d "" b && IFS= read -r -d "" c && IFS= read -r -d "" d '
              '&& IFS= read -r -d "" e && IFS= read -r -d "" f; } < "$1"; printf "%s\\n" "$d"')
    (tmp_path / "settings.bin").write_bytes(proc.stdout)
    got = subprocess.run(["bash", "-c", script, "bash", str(tmp_path / "settings.bin")], cwd=tmp_path,
                         capture_output=True)
    assert got.returncode == 0 and got.stdout.decode("utf-8") == f"{odd / 'B.txt'}\n"
    assert not (tmp_path / "pwned").exists() and not (ROOT / "pwned").exists()


def test_cli_models_and_allow_stale(tmp_path):
    out, layout = prepared(tmp_path)
    proc = run_state(out, "models")
    assert proc.returncode == 1
    assert b"stage1 (" in proc.stderr and b"retrain (bash train.sh), or set ALLOW_STALE=1" in proc.stderr
    proc = run_state(out, "models", "--allow-stale", "1")
    assert proc.returncode == 0 and b"(ALLOW_STALE=1: used anyway)" in proc.stderr
    assert run_state(out, "models", "--except-stages", "stage1 stage2").returncode == 0  # both retrained: no check
    fake_trained(layout)
    assert run_state(out, "models").returncode == 0 and run_state(out, "data").returncode == 0
    proc = run_state(out, "models", "--runs", "all")
    assert proc.returncode == 1 and b"RUNS: unknown run 'all'" in proc.stderr


def test_a_new_test_list_alone_keeps_the_models_current(tmp_path):
    out, layout = prepared(tmp_path)
    fake_trained(layout)
    before = T.check_data(layout)["fingerprint"]
    b = tmp_path / "data" / "B.txt"
    b.write_text("\n".join(b.read_text(encoding="utf-8").split()[:4]) + "\n", encoding="utf-8")  # round B's list
    prepared(tmp_path, out)
    manifest = T.check_data(layout)
    assert T.changed_parts(before, manifest["fingerprint"]) == ["test_images", "test_list"]  # none trained on them
    assert T.stale_models(layout, manifest, STAGES, ["final"]) == []


def test_adding_folds_keeps_the_final_models_current(tmp_path):
    out, layout = prepared(tmp_path)
    fake_trained(layout)
    prepared(tmp_path, out, "--folds", "2")
    manifest = T.check_data(layout)
    assert T.stale_models(layout, manifest, STAGES, ["final"]) == []
    assert T.stale_models(layout, manifest, ["stage1"], T.runs_of(manifest, ["folds"])) == [  # only the new folds
        f"fold {i}'s stage1 ({layout.run_dir('stage1', i)}): no trained model recorded; run train.sh (its fold runs)"
        for i in range(2)]


def test_each_run_records_only_what_it_trains_on(tmp_path):
    """trained_on.json holds the run's own fingerprint (its rows, the training images, its base model, the recipe),
    not the data's: a stage-set setting of stage 2 alone makes stage 2 stale, naming its training rows."""
    out, layout = prepared(tmp_path)
    fake_trained(layout)
    manifest = T.check_data(layout)
    for stage in STAGES:
        recorded = T.trained_on(layout.trained_on(stage))
        assert recorded == T.run_fingerprint(layout, manifest, stage, "final") != manifest["fingerprint"]
        assert set(recorded["parts"]) == {"train_rows", "val_rows", "train_images", "model", "recipe"}
        assert recorded["parts"]["model"] == manifest["settings"][f"model_{stage}"]
    assert T.trained_on(layout.trained_on("stage1")) != T.trained_on(layout.trained_on("stage2"))
    prepared(tmp_path, out, compose_extra=("--stage2-high-repeat", "2"))
    assert T.stale_models(layout, T.check_data(layout), STAGES, ["final"]) == [
        "stage2 was trained on other data than data-pre.sh prepared since: its training rows (the split, the "
        "stage-set settings or the augmented copies) changed (train_rows)"]
