"""data-pre.sh's step 1 with real-world images: prepared copies, names from the list, bad images."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.helpers import compose, make_official, prepare, write_image
from tools.data.images import model_size
from tools.decide.fuse import fuse_test
from tools.decide.validate import validate_submission
from tools.fileio import DataError, read_jsonl
from tools.probs import write_probs
from tools.task import LABELS, Layout


def test_every_row_reads_a_prepared_image_named_as_the_list_names_it(tmp_path):
    data = make_official(tmp_path / "data")
    # a symlinked test image and a symlinked training folder (DVC, git-annex, cp -s layouts)
    store = tmp_path / "store"
    store.mkdir()
    os.replace(data / "B" / "t0.jpg", store / "blob-1234")
    (data / "B" / "t0.jpg").symlink_to(store / "blob-1234")
    os.replace(data / "train", store / "train")
    (data / "train").symlink_to(store / "train")
    out = tmp_path / "out"
    record = prepare(data, out, "--val-ratio", "0.25", "--max-pixels", "28224")
    compose(out)
    layout = Layout(out)
    assert record["train_images"] == str(layout.prepared_images("train"))
    assert record["source_train_images"] == str((data / "train").resolve())
    rows = read_jsonl(layout.train_jsonl("stage1")) + read_jsonl(layout.val_jsonl("stage1")) + read_jsonl(layout.test_jsonl)
    for row in rows:
        path = row["images"][0]
        assert path.startswith(str(layout.data_dir / "images")) and os.path.isfile(path) and not os.path.islink(path)
    test_names = [os.path.basename(r["images"][0]) for r in read_jsonl(layout.test_jsonl)]
    assert test_names == [f"t{i}.jpg" for i in range(5)]  # the list's names, not the symlink targets'
    with Image.open(layout.prepared_images("train") / "0_0.jpg") as img:
        assert (img.height, img.width) == model_size(24, 32, 28224)


def test_an_unchanged_image_is_not_prepared_again(tmp_path):
    data = make_official(tmp_path / "data")
    out = tmp_path / "out"
    prepare(data, out, "--val-ratio", "0.25", "--max-pixels", "28224")
    prepared = Layout(out).prepared_images("train") / "0_0.jpg"
    before = prepared.stat().st_mtime_ns
    os.utime(data / "train" / "1_0.jpg")  # touched: prepared again
    prepare(data, out, "--val-ratio", "0.25", "--max-pixels", "28224")
    assert prepared.stat().st_mtime_ns == before
    prepare(data, out, "--val-ratio", "0.25", "--max-pixels", "50176")  # another size: all again
    assert prepared.stat().st_mtime_ns != before


def test_an_unreadable_training_image_stops_the_step_unless_skipped(tmp_path, capsys):
    data = make_official(tmp_path / "data")
    (data / "train" / "2_1.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"train.txt:10: unreadable image.*\n.*SKIP_BAD_IMAGES=1"):
        prepare(data, out, "--val-ratio", "0.25")
    assert not Layout(out).split_dir.exists()
    record = prepare(data, out, "--val-ratio", "0.25", "--skip-bad-images", "1")
    assert list(record["skipped_train_images"]) == ["2_1.jpg"]
    assert "2_1.jpg" not in Layout(out).train_split.read_text(encoding="utf-8") + Layout(out).val_list.read_text(encoding="utf-8")
    assert "left out (SKIP_BAD_IMAGES=1)" in capsys.readouterr().err


def test_an_unreadable_test_image_gets_the_fallback_label_and_the_submission_is_whole(tmp_path, capsys):
    data = make_official(tmp_path / "data", n_per_label=4)
    lines = (data / "train.txt").read_text(encoding="utf-8").splitlines()
    for i in range(6):  # 无风险 the most common training label
        write_image(data / "train" / f"extra{i}.jpg")
        lines.append(f"extra{i}.jpg\t无风险")
    (data / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (data / "B" / "t3.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    record = prepare(data, out, "--val-ratio", "0.25")
    assert list(record["bad_test_images"]) == ["t3.jpg"]
    assert "unreadable test image, it gets the fallback label" in capsys.readouterr().err
    compose(out)
    layout = Layout(out)
    scored = [os.path.basename(r["images"][0]) for r in read_jsonl(layout.test_jsonl)]
    assert scored == ["t0.jpg", "t1.jpg", "t2.jpg", "t4.jpg"]
    probs = np.tile([0.9, 0.025, 0.025, 0.025, 0.025], (4, 1))  # every readable image: 高风险
    write_probs(layout.probs("stage1", "test"), scored, probs)
    write_probs(layout.probs("stage2", "test"), scored, probs)
    fuse_test(out, quiet=True)
    rows = [line.split("\t") for line in layout.submission.read_text(encoding="utf-8").splitlines()]
    assert [r[0] for r in rows] == [f"t{i}.jpg" for i in range(5)]
    assert rows[3][1] == "无风险" and {r[1] for i, r in enumerate(rows) if i != 3} == {LABELS[0]}
    assert validate_submission(layout.submission, data / "B.txt") == 5
    assert "t3.jpg: unreadable" in capsys.readouterr().err
    manifest = json.loads(layout.manifest.read_text(encoding="utf-8"))
    assert manifest["bad_test_images"] == {"t3.jpg": record["bad_test_images"]["t3.jpg"]}
