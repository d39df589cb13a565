"""tools.augment.contact_sheet: which originals, and the picture."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from tests.helpers import fake_samples, write_samples
from tools.augment.contact_sheet import contact_rows, contact_sheet
from tools.task import LABELS

SMALL = 224 * 168


def test_contact_rows_take_each_label_first():
    samples = fake_samples({"无风险": 3, "中风险": 2, "高风险": 1})
    rows = contact_rows(samples, n=5)
    assert [s.name for s in rows] == ["高风险0.jpg", "中风险0.jpg", "无风险0.jpg", "无风险1.jpg", "无风险2.jpg"]
    assert [s.name for s in contact_rows(samples, n=2)] == ["高风险0.jpg", "中风险0.jpg"]
    assert len(contact_rows(samples, n=10)) == 6 and contact_rows([], n=3) == []


def test_contact_sheet_png(tmp_path, cutouts):
    samples = write_samples(tmp_path / "train", ["高风险", "无风险", "低风险", "非楼道", "中风险"])
    sheet = contact_sheet(contact_rows(samples, 5), tmp_path / "sheet.png", cutouts=cutouts, max_pixels=SMALL)
    assert sheet == Path(tmp_path / "sheet.png")
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.height > 5 * 160 and im.width > 4 * 160
        width_with_insert = im.width
    # without cut-outs there is no insertion column: one column fewer
    contact_sheet(samples, tmp_path / "plain.png", max_pixels=SMALL)
    with Image.open(tmp_path / "plain.png") as im:
        assert im.width < width_with_insert and im.height > 5 * 160
    assert sorted(s.label for s in samples) == sorted(LABELS)
