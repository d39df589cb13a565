"""tools.augment.record: the index of copies, the split digest, and how tools.compose reads the kept copies."""
from __future__ import annotations

import hashlib

import pytest

from tests.helpers import write_image
from tools.augment.record import INDEX_COLUMNS, kept_copies, read_index, split_digest, write_index
from tools.data.lists import Sample, write_list
from tools.fileio import DataError, write_json, write_text
from tools.task import HIGH_RISK, Layout


def test_index_round_trip(tmp_path):
    rows = [("a_aug1.jpg", HIGH_RISK, "a.jpg", "无风险", "insert+colour", True),
            ("b_aug1.jpg", "非楼道", "b.jpg", "非楼道", "geometric", False)]
    write_index(tmp_path / "index.tsv", rows)
    assert (tmp_path / "index.tsv").read_text(encoding="utf-8").splitlines()[0] == "\t".join(INDEX_COLUMNS)
    assert read_index(tmp_path / "index.tsv") == [dict(zip(INDEX_COLUMNS, [*r[:5], str(int(r[5]))])) for r in rows]


def test_kept_copies_belong_to_the_current_split(tmp_path):
    layout = Layout(tmp_path / "out")
    write_text(layout.train_split, "a.jpg\t无风险\n")
    assert split_digest(layout) == hashlib.sha256(b"a.jpg\t\xe6\x97\xa0\xe9\xa3\x8e\xe9\x99\xa9\n").hexdigest()
    with pytest.raises(DataError, match="report.json: not found"):
        kept_copies(layout)
    copy = Sample("a_aug1.jpg", write_image(layout.augmented_images / "a_aug1.jpg"), HIGH_RISK, "augment")
    write_list(layout.augmented_list, [copy])
    write_index(layout.augmented_index, [("a_aug1.jpg", HIGH_RISK, "a.jpg", "无风险", "insert", True),
                                         ("a_aug2.jpg", "无风险", "a.jpg", "无风险", "colour", False)])
    write_json(layout.augment_report, {"split_sha256": split_digest(layout), "seed": 1})
    copies, sources, report = kept_copies(layout)
    assert [(c.name, c.path, c.label) for c in copies] == [("a_aug1.jpg", copy.path.resolve(), HIGH_RISK)]
    assert sources == {"a_aug1.jpg": "a.jpg", "a_aug2.jpg": "a.jpg"} and report["seed"] == 1
    write_text(layout.augmented_list, "")  # the filter dropped every copy
    assert kept_copies(layout)[0] == []
    write_text(layout.train_split, "a.jpg\t低风险\n")  # the split changed since
    with pytest.raises(DataError, match="another training split"):
        kept_copies(layout)
