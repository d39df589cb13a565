"""tools.data.prepare, step 1 of data-pre.sh: validate, prepare every image once, split, deal the folds; it writes
data/split/ and data/images/ and nothing else."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import files_under, list_pairs, make_official, prepare, write_image
from tools.data.images import model_size
from tools.data.lists import read_list
from tools.data.prepare import main as prepare_main
from tools.fileio import DataError
from tools.task import LABELS, Layout


@pytest.fixture
def official(tmp_path) -> Path:
    return make_official(tmp_path / "data", n_per_label=6)  # val 0.25: 2 per label held out, 4 left to fold


def test_prepare_writes_the_split_the_prepared_images_and_nothing_else(tmp_path, capsys):
    data = make_official(tmp_path / "data")
    out = tmp_path / "out"
    record = prepare(data, out, "--val-ratio", "0.25")
    layout = Layout(out)
    train_names = [name for name, _ in list_pairs(data / "train.txt")]
    test_names = [f"t{i}.jpg" for i in range(5)]
    assert set(files_under(out)) == {"data/split/train.txt", "data/split/val.txt", "data/split/test.txt",
                                     "data/split/split.json", "data/images/train/.prepared.json",
                                     "data/images/test/.prepared.json",
                                     *(f"data/images/train/{n}" for n in train_names),
                                     *(f"data/images/test/{n}" for n in test_names)}
    for path in [layout.prepared_images("train") / n for n in train_names] + \
            [layout.prepared_images("test") / n for n in test_names]:
        with Image.open(path) as img:  # 32x24 sources at the default MAX_PIXELS, as swift would feed them
            assert (img.height, img.width) == model_size(24, 32, 1003520) and img.mode == "RGB"
    fit, val = list_pairs(layout.train_split), list_pairs(layout.val_list)
    assert {n for n, _ in fit}.isdisjoint({n for n, _ in val}) and len(fit) + len(val) == 20
    assert Counter(label for _, label in val) == {label: 1 for label in LABELS}
    given = dict(list_pairs(data / "train.txt"))
    assert all(given[n] == label for n, label in fit + val)  # labels as given
    assert layout.test_list.read_text(encoding="utf-8") == "".join(f"t{i}.jpg\n" for i in range(5))  # list order
    assert record == json.loads(layout.split_record.read_text(encoding="utf-8"))
    assert record["test_labelled"] is False and record["folds"] == 1 and record["seed"] == 42
    assert record["val_ratio"] == 0.25 and record["max_pixels"] == 1003520
    # the later steps read the prepared folders; the originals are recorded for the fingerprint
    assert record["train_images"] == str(layout.prepared_images("train"))
    assert record["test_images"] == str(layout.prepared_images("test"))
    assert record["source_train_images"] == str((data / "train").resolve())
    assert record["source_test_images"] == str((data / "B").resolve())
    assert record["skipped_train_images"] == {} and record["bad_test_images"] == {}
    assert record["counts"]["val"] == dict.fromkeys(LABELS, 1) and record["counts"]["train"] == dict.fromkeys(LABELS, 3)
    assert "高风险" in capsys.readouterr().out


def test_a_labelled_test_list_keeps_its_labels(tmp_path):
    data = make_official(tmp_path / "data")
    (data / "B.txt").write_text("".join(f"t{i}.jpg\t{label}\n" for i, label in enumerate(LABELS)), encoding="utf-8")
    record = prepare(data, tmp_path / "out")
    assert record["test_labelled"] is True and record["counts"]["test"] == dict.fromkeys(LABELS, 1)
    assert list_pairs(Layout(tmp_path / "out").test_list) == [(f"t{i}.jpg", label) for i, label in enumerate(LABELS)]


def test_prepare_refuses_bad_data(tmp_path):
    data = make_official(tmp_path / "data")
    with open(data / "train.txt", "a", encoding="utf-8") as f:
        f.write("0_0.jpg\t中风险\n")  # conflicting duplicate
    with pytest.raises(DataError, match=r"train.txt:21: 0_0.jpg listed again"):
        prepare(data, tmp_path / "out")
    assert not (tmp_path / "out" / "data").exists()  # nothing written on bad data
    assert prepare_main(["--data-dir", str(data), "--output-dir", str(tmp_path / "out"), "--workers", "1"]) == 1


@pytest.mark.parametrize("ratio", ["0", "1", "-0.1"])
def test_a_validation_ratio_outside_0_to_1_is_refused_before_anything_is_written(tmp_path, ratio):
    """VAL_RATIO=0 left swift without validation rows (a bare StopIteration); 1 leaves nothing to train on."""
    data = make_official(tmp_path / "data")
    with pytest.raises(DataError, match=rf"VAL_RATIO \(--val-ratio\) must be between 0 and 1, both excluded, "
                                        rf"got {float(ratio)}"):
        prepare(data, tmp_path / "out", "--val-ratio", ratio)
    assert not (tmp_path / "out").exists()


def test_test_images_in_the_training_list_are_refused(tmp_path):
    data = make_official(tmp_path / "data")
    (data / "A.txt").write_text("t0.jpg\n0_1.jpg\n", encoding="utf-8")
    write_image(data / "train" / "t0.jpg")
    with pytest.raises(DataError, match=r"A.txt: 1 test image\(s\) also in .*train.txt, e.g. 0_1.jpg"):
        prepare(data, tmp_path / "out", "--test-list", str(data / "A.txt"), "--test-images", str(data / "train"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5", ""])
def test_bad_folds_value_is_refused_naming_the_knob(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        prepare_main(["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--folds", bad])
    assert exc.value.code == 2
    assert f"FOLDS (--folds) must be a whole number >= 1 (1 = no folds), got {bad!r}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_too_many_folds_for_the_rarest_label_writes_nothing(official, tmp_path):
    with pytest.raises(DataError, match=r"FOLDS=5 \(--folds\): the training split has only 4 "):
        prepare(official, tmp_path / "out", "--val-ratio", "0.25", "--folds", "5")
    assert not (tmp_path / "out").exists()
    assert prepare_main(["--data-dir", str(official), "--output-dir", str(tmp_path / "out"), "--folds", "5",
                         "--val-ratio", "0.25", "--workers", "1"]) == 1


def test_fold_lists_partition_the_training_split(official, tmp_path):
    plain, out = tmp_path / "plain", tmp_path / "out"
    prepare(official, plain, "--val-ratio", "0.25")
    record = prepare(official, out, "--val-ratio", "0.25", "--folds", "2")
    layout = Layout(out)
    fit = read_list(layout.train_split, official / "train", labelled=True, check_images=False)
    heldout = [read_list(layout.fold_list(i), official / "train", labelled=True, check_images=False) for i in range(2)]
    # the folds partition the training split (not the validation split), stratified, in the split's order
    assert sorted(s.name for h in heldout for s in h) == sorted(s.name for s in fit)
    assert all(Counter(s.label for s in h) == dict.fromkeys(LABELS, 2) for h in heldout)
    order = {s.name: i for i, s in enumerate(fit)}
    assert all([order[s.name] for s in h] == sorted(order[s.name] for s in h) for h in heldout)
    assert record["folds"] == 2 and record["counts"]["folds"] == [dict.fromkeys(LABELS, 2)] * 2
    # folds change nothing else: the split is byte for byte that of FOLDS=1
    with_folds = files_under(out)
    assert set(with_folds) == set(files_under(plain)) | {"data/split/folds/0.txt", "data/split/folds/1.txt"}
    for name, content in files_under(plain).items():
        if name != "data/split/split.json":
            assert with_folds[name] == content, name


def test_folds_1_after_folds_2_leaves_no_fold_list(official, tmp_path):
    """A re-run with FOLDS=1 leaves exactly what a plain run leaves: no stale fold list of the earlier split."""
    out = tmp_path / "out"  # one folder throughout: split.json names its prepared image folders
    prepare(official, out, "--val-ratio", "0.25")
    plain = files_under(out)
    prepare(official, out, "--val-ratio", "0.25", "--folds", "2")
    assert (Layout(out).split_dir / "folds").exists()
    prepare(official, out, "--val-ratio", "0.25")
    assert not (Layout(out).split_dir / "folds").exists()
    assert files_under(out) == plain
