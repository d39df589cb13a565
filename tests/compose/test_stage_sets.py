"""tools.compose.stage_sets, step 3 of data-pre.sh: the only writer of the swift JSONLs and the manifest (with the
settings train.sh and test.sh read, the data's fingerprint and every data file's digest); the stage sets of the
final run and of each fold, with and without augmented copies."""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import (compose, copies_of, files_under, images_of, list_pairs, make_official, names_in, prepare,
                           prepare_and_compose, relabel_first_line, write_image)
from tools.augment.record import split_digest, write_index
from tools.compose import stage_sets as C
from tools.compose.rules import DEFAULT_COMPOSITION, stage_sets
from tools.data.lists import Sample, read_list, write_list
from tools.fileio import DataError, read_jsonl, write_json
from tools.state import changed_parts, images_digest
from tools.task import HIGH_RISK, LABELS, PROMPT, STAGES, Layout

COMPOSITION = {"stage1_min_share": 0.1, "stage2_high_repeat": 3, "stage2_other_ratio": 2.0}


@pytest.fixture
def official(tmp_path) -> Path:
    return make_official(tmp_path / "data", n_per_label=6)  # val 0.25: 2 per label held out, 4 left to fold


def test_compose_writes_swift_jsonl_and_manifest(tmp_path, capsys):
    data = make_official(tmp_path / "data")
    out = tmp_path / "out"
    record = prepare(data, out, "--val-ratio", "0.25")
    split_files = files_under(out)
    manifest = C.compose(C.build_parser().parse_args([
        "--output-dir", str(out), "--recipe", "real", "--model-stage1", "Qwen/Qwen2.5-VL-7B-Instruct",
        "--model-stage2", "/models/3b dir"]))
    layout = Layout(out)
    train = read_jsonl(layout.train_jsonl("stage1"))
    val = read_jsonl(layout.val_jsonl("stage1"))
    test = read_jsonl(layout.test_jsonl)
    row = train[0]
    assert row["messages"][0] == {"role": "user", "content": "<image>" + PROMPT}
    assert row["messages"][1]["role"] == "assistant" and row["messages"][1]["content"] in LABELS
    assert all(Path(r["images"][0]).is_absolute() and Path(r["images"][0]).exists() for r in train + val + test)
    # every row reads a prepared image, named as the list names it
    assert {str(Path(r["images"][0]).parent) for r in train + val} == {str(layout.prepared_images("train"))}
    assert {str(Path(r["images"][0]).parent) for r in test} == {str(layout.prepared_images("test"))}
    assert {r["images"][0] for r in train}.isdisjoint({r["images"][0] for r in val})
    assert Counter(r["messages"][1]["content"] for r in val) == {label: 1 for label in LABELS}
    assert layout.val_jsonl("stage2").read_bytes() == layout.val_jsonl("stage1").read_bytes()  # judged on the same
    assert [Path(r["images"][0]).name for r in test] == [f"t{i}.jpg" for i in range(5)]
    assert all(len(r["messages"]) == 1 for r in test)  # inference rows: no answer
    assert manifest["test_labelled"] is False
    split = list_pairs(layout.train_split)
    assert {name for name, _ in split} == {Path(r["images"][0]).name for r in train}
    assert manifest["composition"] == {**COMPOSITION, "stage2_target": "five"}
    assert manifest["augmentation"] is None and manifest["folds"] == 1
    assert {k: manifest[k] for k in record} == {**record, "counts": manifest["counts"]}  # the split's record, kept
    assert manifest["counts"]["stage1_rows"] == dict(Counter(r["messages"][1]["content"] for r in train))
    assert json.loads(layout.manifest.read_text(encoding="utf-8")) == manifest
    # the settings train.sh and test.sh read, as plain values (no shell quoting); no pipeline.env any more
    assert manifest["settings"] == {"recipe": "real", "model_stage1": "Qwen/Qwen2.5-VL-7B-Instruct",
                                    "model_stage2": "/models/3b dir", "test_list": record["test_list"],
                                    "test_labelled": 0, "folds": 1, "stage2_target": "five"}
    assert not (out / "pipeline.env").exists()
    # every data file the three steps wrote has its digest in the manifest, the manifest itself and the prepared
    # images excepted (their sources are in the fingerprint's image parts)
    digested = {name: content for name, content in files_under(out).items()
                if name != "data/manifest.json" and not name.startswith("data/images/")}
    assert set(manifest["files"]) == set(digested)
    assert all(manifest["files"][name] == hashlib.sha256(content).hexdigest() for name, content in digested.items())
    # the fingerprint: one digest over named parts, so a mismatch can say what changed
    assert set(manifest["fingerprint"]["parts"]) == {"train_list", "test_list", "train_images", "test_images", "split",
                                                     "composition", "augmentation", "recipe", "model_stage1",
                                                     "model_stage2"}
    assert manifest["fingerprint"]["parts"]["model_stage2"] == "/models/3b dir"
    assert manifest["fingerprint"]["parts"]["augmentation"] == "none"
    # the image parts are the source images' (sizes and times, in name order), not the prepared copies'
    names = sorted(name for name, _ in split + list_pairs(layout.val_list))
    assert manifest["fingerprint"]["parts"]["train_images"] == images_digest(
        sorted(Path(record["source_train_images"]) / name for name in names))
    assert manifest["fingerprint"]["parts"]["test_images"] == images_digest(
        sorted(Path(record["source_test_images"]) / f"t{i}.jpg" for i in range(5)))
    assert "高风险" in capsys.readouterr().out
    # the split is read, never written; the stage sets are the composition rules' on it
    for name, content in split_files.items():
        assert files_under(out)[name] == content, name
    fit = read_list(layout.train_split, data / "train", labelled=True, check_images=False)
    one, two = stage_sets(fit, DEFAULT_COMPOSITION, 42)
    assert names_in(layout.train_jsonl("stage1")) == [s.name for s in one]
    assert names_in(layout.train_jsonl("stage2")) == [s.name for s in two]


def test_composition_flags_reach_the_rows_and_the_manifest(tmp_path):
    data = make_official(tmp_path / "data", n_per_label=6)
    out = tmp_path / "out"
    composition = {"stage1_min_share": 0.3, "stage2_high_repeat": 2, "stage2_other_ratio": 1.5}
    manifest = prepare_and_compose(data, out, "--seed", "7", compose_extra=(
        "--stage1-min-share", "0.3", "--stage2-high-repeat", "2", "--stage2-other-ratio", "1.5"))
    layout = Layout(out)
    assert manifest["composition"] == {**composition, "stage2_target": "five"}
    fit = read_list(layout.train_split, data / "train", labelled=True, check_images=False)
    one, two = stage_sets(fit, composition, 7)  # the split's seed
    assert names_in(layout.train_jsonl("stage1")) == [s.name for s in one]
    assert names_in(layout.train_jsonl("stage2")) == [s.name for s in two]
    assert Counter(r["messages"][1]["content"] for r in read_jsonl(layout.train_jsonl("stage2")))[HIGH_RISK] == 2 * 5


def test_compose_needs_the_split(tmp_path, capsys):
    with pytest.raises(DataError, match=r"split.json: not found: run tools.data.prepare"):
        compose(tmp_path / "out")
    assert C.main(["--output-dir", str(tmp_path / "out")]) == 1
    assert "run tools.data.prepare" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_manifest_records_settings_as_they_were_given(tmp_path):
    """A value with spaces, quotes, `$(...)` and non-ASCII is stored as it is (JSON), never as shell code."""
    data = make_official(tmp_path / "data")
    odd = "/models/my ele's \"7b\" $(touch /tmp/pwned) `id` 模型"
    manifest = prepare_and_compose(data, tmp_path / "out", "--val-ratio", "0.25",
                                   compose_extra=("--model-stage1", odd, "--recipe", "real"))
    assert manifest["settings"]["model_stage1"] == odd == manifest["fingerprint"]["parts"]["model_stage1"]
    assert json.loads(Layout(tmp_path / "out").manifest.read_text(encoding="utf-8"))["settings"]["model_stage1"] == odd


def test_same_data_same_fingerprint_and_each_change_names_its_part(tmp_path):
    data = make_official(tmp_path / "data", n_per_label=6)
    a = prepare_and_compose(data, tmp_path / "a", "--val-ratio", "0.25")["fingerprint"]
    b = prepare_and_compose(data, tmp_path / "b", "--val-ratio", "0.25")["fingerprint"]
    assert a == b  # another output folder, the same data: the same fingerprint
    reseeded = prepare_and_compose(data, tmp_path / "c", "--val-ratio", "0.25", "--seed", "1")["fingerprint"]
    assert "split" in changed_parts(a, reseeded)  # (alone: test_a_new_seed_changes_only_the_split_part)
    changed = {
        "composition": prepare_and_compose(data, tmp_path / "d", "--val-ratio", "0.25",
                                           compose_extra=("--stage2-high-repeat", "2")),
        "model_stage2": prepare_and_compose(data, tmp_path / "e", "--val-ratio", "0.25",
                                            compose_extra=("--model-stage2", "/m3")),
    }
    for part, manifest in changed.items():
        assert changed_parts(a, manifest["fingerprint"]) == [part], part
    relabel_first_line(data)
    relabelled = prepare_and_compose(data, tmp_path / "f", "--val-ratio", "0.25")["fingerprint"]
    assert "train_list" in changed_parts(a, relabelled)
    image = data / "B" / "t0.jpg"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # touched: maybe new bytes
    touched = prepare_and_compose(data, tmp_path / "g", "--val-ratio", "0.25")["fingerprint"]
    assert changed_parts(relabelled, touched) == ["test_images"]


def test_a_new_seed_changes_only_the_split_part(tmp_path):
    data = make_official(tmp_path / "data", n_per_label=6)
    a = prepare_and_compose(data, tmp_path / "a", "--val-ratio", "0.25")["fingerprint"]
    b = prepare_and_compose(data, tmp_path / "b", "--val-ratio", "0.25", "--seed", "1")["fingerprint"]
    assert changed_parts(a, b) == ["split"]


# --------------------------------------------------------------------------- augmented copies (--augment 1)
def fake_augmentation(layout: Layout, copies: list[tuple[str, str, str]]) -> None:
    """data/augmented/ as tools.augment.run leaves it, for (copy name, label, source image) without rendering."""
    kept = []
    for name, label, _ in copies:
        path = write_image(layout.augmented_images / name)
        kept.append(Sample(name, path, label, "augment"))
    write_list(layout.augmented_list, kept)
    write_index(layout.augmented_index, [(name, label, source, label, "geometric", True)
                                         for name, label, source in copies])
    write_json(layout.augment_report, {"split_sha256": split_digest(layout),
                                       "counts": {"kept": {HIGH_RISK: len(copies)}}})


def test_copies_go_into_the_training_rows_only(tmp_path):
    data = make_official(tmp_path / "data", n_per_label=6)
    out = tmp_path / "out"
    prepare(data, out, "--val-ratio", "0.25")
    layout = Layout(out)
    fit = read_list(layout.train_split, data / "train", labelled=True, check_images=False)
    high = [s.name for s in fit if s.label == HIGH_RISK]
    fake_augmentation(layout, [(f"{Path(high[i % 4]).stem}_aug{i}.jpg", HIGH_RISK, high[i % 4]) for i in range(6)])
    plain = files_under(out)
    manifest = compose(out, "--augment", "1")
    copies = {str((layout.augmented_images / f"{Path(high[i % 4]).stem}_aug{i}.jpg").resolve()) for i in range(6)}
    stage1 = images_of(layout.train_jsonl("stage1"))
    assert {p for p in stage1 if p in copies} == copies and len(stage1) == len(set(stage1))  # every copy once
    block = [p for p, r in zip(images_of(layout.train_jsonl("stage2")), read_jsonl(layout.train_jsonl("stage2")))
             if r["messages"][1]["content"] == HIGH_RISK]
    assert len(block) == 3 * 4 and len(set(block)) == 4 + 6  # 4 originals, 6 copies, 2 repeats
    for path in (layout.val_jsonl("stage1"), layout.val_jsonl("stage2"), layout.test_jsonl):
        assert not set(images_of(path)) & copies
    assert manifest["augmentation"]["split_sha256"] == split_digest(layout)
    assert manifest["counts"]["stage1_rows"][HIGH_RISK] == 4 + 6
    # augmented/ is read, never written
    assert {k: v for k, v in files_under(out).items() if k.startswith("data/augmented/")} == \
        {k: v for k, v in plain.items() if k.startswith("data/augmented/")}
    # without --augment the copies are ignored: the rows are a plain run's
    compose(out)
    assert not set(images_of(layout.train_jsonl("stage1"))) & copies


def test_copies_of_another_split_or_no_augmentation_are_refused(tmp_path, capsys):
    data = make_official(tmp_path / "data", n_per_label=6)
    out = tmp_path / "out"
    prepare(data, out)
    layout = Layout(out)
    with pytest.raises(DataError, match=r"report.json: not found: run the augmentation step"):
        compose(out, "--augment", "1")
    fit = list_pairs(layout.train_split)
    fake_augmentation(layout, [("x_aug1.jpg", HIGH_RISK, fit[0][0])])
    compose(out, "--augment", "1")
    prepare(data, out, "--seed", "3")  # another split: the copies belong to the old one
    with pytest.raises(DataError, match=r"the copies were made from another training split"):
        compose(out, "--augment", "1")
    assert C.main(["--output-dir", str(out), "--augment", "1"]) == 1
    assert "another training split" in capsys.readouterr().err


# --------------------------------------------------------------------------- the fold sets
def test_fold_sets_hold_out_their_fold_and_train_on_the_rest(official, tmp_path):
    out = tmp_path / "out"  # FOLDS=1 first, in the same folder: the rows name its prepared images
    prepare_and_compose(official, out, "--val-ratio", "0.25")
    plain = files_under(out)
    manifest = prepare_and_compose(official, out, "--val-ratio", "0.25", "--folds", "2")
    layout = Layout(out)
    fit = read_list(layout.train_split, official / "train", labelled=True, check_images=False)
    val = {name for name, _ in list_pairs(layout.val_list)}
    heldout = [read_list(layout.fold_list(i), official / "train", labelled=True, check_images=False) for i in range(2)]
    assert manifest["folds"] == 2
    assert [c["heldout"] for c in manifest["counts"]["folds"]] == [dict.fromkeys(LABELS, 2)] * 2

    for i, held in enumerate(heldout):
        held_names = {s.name for s in held}
        rest = [s for s in fit if s.name not in held_names]
        assert names_in(layout.heldout_jsonl(i)) == [s.name for s in held]
        assert [r["messages"][1]["content"] for r in read_jsonl(layout.heldout_jsonl(i))] == [s.label for s in held]
        # the normal composition rules on the other folds: exactly stage_sets of the rest
        for stage, rows in zip(STAGES, stage_sets(rest, COMPOSITION, 42)):
            got = names_in(layout.train_jsonl(stage, i))
            assert got == [s.name for s in rows]
            assert not set(got) & held_names and not set(got) & val
        assert set(names_in(layout.train_jsonl("stage1", i))) == {s.name for s in rest}
        stage1_rows = stage_sets(rest, COMPOSITION, 42)[0]
        assert manifest["counts"]["folds"][i]["stage1_rows"] == Counter(s.label for s in stage1_rows)

    # folds change nothing else: the split and the normal sets are byte for byte those of FOLDS=1
    with_folds = files_under(out)
    for name, content in plain.items():
        if name not in ("data/manifest.json", "data/split/split.json"):
            assert with_folds[name] == content, name
    assert manifest["settings"]["folds"] == 2
    assert {f"data/folds/{i}/{n}" for i in range(2) for n in ("stage1_train.jsonl", "stage2_train.jsonl",
                                                                "heldout.jsonl")} <= set(manifest["files"])
    assert {f"data/split/folds/{i}.txt" for i in range(2)} <= set(manifest["files"])


def test_folds_1_after_folds_2_leaves_no_fold_sets(official, tmp_path):
    """data-pre.sh with FOLDS=1 after FOLDS=2: no fold files left behind, the output is exactly a plain run's."""
    out = tmp_path / "out"  # one folder throughout: the rows name its prepared images
    prepare_and_compose(official, out, "--val-ratio", "0.25")
    plain = files_under(out)
    prepare_and_compose(official, out, "--val-ratio", "0.25", "--folds", "2")
    layout = Layout(out)
    assert (layout.data_dir / "folds").exists()
    prepare_and_compose(official, out, "--val-ratio", "0.25")
    assert json.loads(layout.manifest.read_text(encoding="utf-8"))["folds"] == 1
    assert not (layout.data_dir / "folds").exists()
    assert files_under(out) == plain


def test_fold_sets_take_only_copies_of_their_training_images(official, tmp_path):
    out = tmp_path / "out"
    prepare(official, out, "--val-ratio", "0.25", "--folds", "2")
    layout = Layout(out)
    held = [{name for name, _ in list_pairs(layout.fold_list(i))} for i in range(2)]
    fit = read_list(layout.train_split, official / "train", labelled=True, check_images=False)
    copies = copies_of(fit, HIGH_RISK, 8)  # copy k of the k-th 高风险 original (mod 4)
    sources = [s.name for s in fit if s.label == HIGH_RISK]
    fake_augmentation(layout, [(c.name, HIGH_RISK, sources[i % 4]) for i, c in enumerate(copies)])
    compose(out, "--augment", "1")
    for i in range(2):
        allowed = {c.name for k, c in enumerate(copies) if sources[k % 4] not in held[i]}
        assert allowed and len(allowed) < len(copies)
        for stage in STAGES:
            got = set(names_in(layout.train_jsonl(stage, i)))
            assert not got & ({c.name for c in copies} - allowed)  # no copy of a held-out image
        assert allowed <= set(names_in(layout.train_jsonl("stage1", i)))  # stage 1 takes every copy it may have
    assert {c.name for c in copies} <= set(names_in(layout.train_jsonl("stage1")))  # the final run takes them all
