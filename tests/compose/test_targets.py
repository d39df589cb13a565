"""The specialist's target (five labels or 高风险 vs 非高风险) and the rows for a classification head."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tests.helpers import compose, make_official, prepare
from tools.fileio import read_jsonl
from tools.state import class_shares
from tools.task import BINARY_LABELS, BINARY_PROMPT, HIGH_RISK, IMAGE_TAG, LABELS, NOT_HIGH_RISK, PROMPT, Layout


def test_binary_specialist_rows_and_prompt(tmp_path):
    data = make_official(tmp_path / "data")
    out = tmp_path / "out"
    prepare(data, out, "--val-ratio", "0.25")
    manifest = compose(out, "--stage2-target", "binary")
    layout = Layout(out)
    for path in (layout.train_jsonl("stage2"), layout.val_jsonl("stage2")):
        rows = read_jsonl(path)
        assert {r["messages"][0]["content"] for r in rows} == {IMAGE_TAG + BINARY_PROMPT}
        assert Counter(r["messages"][1]["content"] for r in rows).keys() == {HIGH_RISK, NOT_HIGH_RISK}
    stage1 = read_jsonl(layout.train_jsonl("stage1"))  # stage 1 keeps the five labels and the task prompt
    assert {r["messages"][0]["content"] for r in stage1} == {IMAGE_TAG + PROMPT}
    assert {r["messages"][1]["content"] for r in stage1} <= set(LABELS)
    assert manifest["composition"]["stage2_target"] == "binary" and manifest["settings"]["stage2_target"] == "binary"
    # the same images in the same order as the five-label set
    five = tmp_path / "five"
    prepare(data, five, "--val-ratio", "0.25")
    compose(five)
    assert [Path(r["images"][0]).name for r in read_jsonl(Layout(five).train_jsonl("stage2"))] == \
        [Path(r["images"][0]).name for r in read_jsonl(layout.train_jsonl("stage2"))]


def test_seq_cls_rows_carry_the_class_index_and_no_answer(tmp_path):
    data = make_official(tmp_path / "data")
    out = tmp_path / "out"
    prepare(data, out, "--val-ratio", "0.25")
    compose(out, "--stage2-target", "binary")
    layout = Layout(out)
    for stage, labels in (("stage1", LABELS), ("stage2", BINARY_LABELS)):
        text = read_jsonl(layout.train_jsonl(stage))
        head = read_jsonl(layout.train_jsonl(stage, task="seq_cls"))
        assert len(text) == len(head)
        for t, h in zip(text, head):
            assert h["images"] == t["images"] and len(h["messages"]) == 1  # the answer is not in the input
            assert labels[h["label"]] == t["messages"][1]["content"]
        assert layout.val_jsonl(stage, "seq_cls").exists()
    manifest = json.loads(layout.manifest.read_text(encoding="utf-8"))
    assert str(layout.train_jsonl("stage2", task="seq_cls").relative_to(layout.root)) in manifest["files"]


def test_class_shares_of_a_stage(tmp_path):
    data = make_official(tmp_path / "data")
    out = tmp_path / "out"
    prepare(data, out, "--val-ratio", "0.25")
    manifest = compose(out, "--stage2-target", "binary")
    shares = class_shares(Layout(out), manifest, "stage2", "final")
    assert shares["labels"] == list(BINARY_LABELS)
    rows = read_jsonl(Layout(out).train_jsonl("stage2"))
    high = sum(r["messages"][1]["content"] == HIGH_RISK for r in rows) / len(rows)
    assert abs(shares["trained"][0] - high) < 1e-12
    train = manifest["counts"]["train"]
    assert abs(shares["real"][0] - train[HIGH_RISK] / sum(train.values())) < 1e-12
    assert abs(sum(shares["real"]) - 1) < 1e-12
    five = class_shares(Layout(out), manifest, "stage1", "final", "seq_cls")
    assert five["labels"] == list(LABELS) and abs(sum(five["trained"]) - 1) < 1e-12
