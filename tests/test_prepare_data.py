"""Split, oversampling, the stage-2 set and the JSONL rows written for swift."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import write_image
from tools.dataset import Sample
from tools.prepare_data import (build_parser, oversample, prepare, stage1_set, stage2_set, stratified_split,
                                train_split_list)
from tools.task import HIGH_RISK, LABELS, PROMPT, Layout

SHARES = {"高风险": 6, "中风险": 20, "低风险": 14, "无风险": 50, "非楼道": 3}


def fake_samples() -> list[Sample]:
    out = []
    for label, n in SHARES.items():
        out += [Sample(f"{label}{i}.jpg", Path(f"/x/{label}{i}.jpg"), label, f"t:{i}") for i in range(n)]
    return out


def test_split_is_stratified_disjoint_and_seeded():
    samples = fake_samples()
    fit, val = stratified_split(samples, 0.2, seed=1)
    assert {s.name for s in fit}.isdisjoint({s.name for s in val})
    assert len(fit) + len(val) == len(samples)
    counts = Counter(s.label for s in val)
    assert counts == {"高风险": 1, "中风险": 4, "低风险": 3, "无风险": 10, "非楼道": 1}  # round(n·0.2), ≥ 1
    again, _ = stratified_split(samples, 0.2, seed=1)
    other, _ = stratified_split(samples, 0.2, seed=2)
    assert [s.name for s in again] == [s.name for s in fit]
    assert [s.name for s in other] != [s.name for s in fit]


def test_split_without_validation_keeps_everything():
    fit, val = stratified_split(fake_samples(), 0.0, seed=0)
    assert val == [] and len(fit) == sum(SHARES.values())


def test_oversample_lifts_rare_labels_to_min_share():
    samples = fake_samples()
    rows = oversample(samples, 0.1, seed=0)
    counts = Counter(s.label for s in rows)
    for label in LABELS:
        assert counts[label] / len(rows) >= 0.1 - 1e-9 or counts[label] == SHARES[label]
    assert counts["无风险"] == 50 and counts["中风险"] == 20  # common labels untouched
    assert counts[HIGH_RISK] > SHARES[HIGH_RISK]
    assert oversample(samples, 0.0, seed=0) != samples  # shuffled, same multiset
    assert Counter(s.name for s in oversample(samples, 0.0, seed=0)) == Counter(s.name for s in samples)


def test_stage2_set_composition():
    rows = stage2_set(fake_samples(), high_repeat=3, other_ratio=2.0, seed=0)
    counts = Counter(s.label for s in rows)
    assert counts[HIGH_RISK] == 18 and counts["中风险"] == 20
    assert counts["低风险"] + counts["无风险"] + counts["非楼道"] == 12


def copies_of(samples: list[Sample], label: str, n: int, new_label: str | None = None) -> list[Sample]:
    """n augmented copies (distinct names) of the label's originals, as tools.augment_data makes them."""
    src = [s for s in samples if s.label == label]
    return [Sample(f"{Path(src[i % len(src)].name).stem}_aug{i}.jpg", Path(f"/aug/{label}{i}.jpg"),
                   new_label or label, f"augment:{i}") for i in range(n)]


def test_without_copies_the_stage_sets_are_unchanged():
    samples = fake_samples()
    assert stage1_set(samples, 0.1, seed=3) == oversample(samples, 0.1, seed=3)
    assert stage1_set(samples, 0.1, seed=3, augmented=[]) == oversample(samples, 0.1, seed=3)
    before = stage2_set(samples, 3, 2.0, seed=3)
    assert stage2_set(samples, 3, 2.0, seed=3, augmented=copies_of(samples, "中风险", 5)) == before  # no 高风险 copy


def test_copies_replace_plain_repeats():
    samples = fake_samples()
    high = copies_of(samples, HIGH_RISK, 40) + copies_of(samples, "无风险", 12, new_label=HIGH_RISK)  # inserted
    other = copies_of(samples, "非楼道", 20)
    rows = stage1_set(samples, 0.1, seed=0, augmented=high + other)
    counts = Counter(s.label for s in rows)
    # every copy once, every original once: the copies lift 高风险 and 非楼道 over 10 %, so no repeats there
    assert counts[HIGH_RISK] == 6 + 52 and counts["非楼道"] == 3 + 20
    names = Counter(s.name for s in rows if s.label in (HIGH_RISK, "非楼道"))
    assert set(names.values()) == {1}
    # too few copies: the label is topped up to its share with repeats, copies first
    few = stage1_set(samples, 0.1, seed=0, augmented=copies_of(samples, HIGH_RISK, 3))
    n_high = sum(s.label == HIGH_RISK for s in few)
    assert n_high / len(few) >= 0.1 - 1e-9 and n_high > 9
    assert {s.name for s in copies_of(samples, HIGH_RISK, 3)} <= {s.name for s in few}

    rows2 = stage2_set(samples, 3, 2.0, seed=0, augmented=high + other)
    before = stage2_set(samples, 3, 2.0, seed=0)
    assert Counter(s.label for s in rows2) == Counter(s.label for s in before)  # the specialist's sizes stay
    block = [s for s in rows2 if s.label == HIGH_RISK]
    assert len(block) == 18 and len({s.name for s in block}) == 18  # 6 originals + 12 copies, no repeat
    assert {s.name for s in samples if s.label == HIGH_RISK} <= {s.name for s in block}
    assert stage2_set(samples, 3, 2.0, seed=0, augmented=high + other) == rows2  # seeded
    short = stage2_set(samples, 3, 2.0, seed=0, augmented=copies_of(samples, HIGH_RISK, 4))
    block = Counter(s.name for s in short if s.label == HIGH_RISK)
    assert sum(block.values()) == 18 and len(block) == 10  # 6 originals, 4 copies, 8 repeats of originals


def make_official(root: Path, n_per_label: int = 4) -> Path:
    lines, test_lines = [], []
    for li, label in enumerate(LABELS):
        for i in range(n_per_label):
            name = f"{li}_{i}.jpg"
            write_image(root / "train" / name, colour=(50 * li, 10 * i, 90))
            lines.append(f"{name}\t{label}")
        test_name = f"t{li}.jpg"
        write_image(root / "B" / test_name, colour=(20, 50 * li, 90))
        test_lines.append(test_name)
    (root / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "B.txt").write_text("\n".join(test_lines) + "\n", encoding="utf-8")
    return root


def test_prepare_writes_swift_jsonl_and_env(tmp_path, capsys):
    data = make_official(tmp_path / "data")
    out = tmp_path / "out"
    args = build_parser().parse_args(["--data-dir", str(data), "--output-dir", str(out), "--val-ratio", "0.25",
                                      "--recipe", "real", "--model-stage1", "Qwen/Qwen2.5-VL-7B-Instruct",
                                      "--model-stage2", "/models/3b dir", "--workers", "1"])
    manifest = prepare(args)
    layout = Layout(out)
    train = [json.loads(line) for line in layout.train_jsonl("stage1").read_text(encoding="utf-8").splitlines()]
    val = [json.loads(line) for line in layout.val_jsonl("stage1").read_text(encoding="utf-8").splitlines()]
    test = [json.loads(line) for line in layout.test_jsonl.read_text(encoding="utf-8").splitlines()]
    row = train[0]
    assert row["messages"][0] == {"role": "user", "content": "<image>" + PROMPT}
    assert row["messages"][1]["role"] == "assistant" and row["messages"][1]["content"] in LABELS
    assert all(Path(r["images"][0]).is_absolute() and Path(r["images"][0]).exists() for r in train + val + test)
    assert {r["images"][0] for r in train}.isdisjoint({r["images"][0] for r in val})
    assert Counter(r["messages"][1]["content"] for r in val) == {label: 1 for label in LABELS}
    assert [Path(r["images"][0]).name for r in test] == [f"t{i}.jpg" for i in range(5)]
    assert all(len(r["messages"]) == 1 for r in test)  # inference rows: no answer
    assert manifest["test_labelled"] is False
    split = train_split_list(layout).read_text(encoding="utf-8").splitlines()
    assert {line.split("\t")[0] for line in split} == {Path(r["images"][0]).name for r in train}
    assert manifest["composition"] == {"stage1_min_share": 0.1, "stage2_high_repeat": 3, "stage2_other_ratio": 2.0}
    env = layout.pipeline_env.read_text(encoding="utf-8")
    assert ': "${RECIPE:=real}"' in env and ": \"${MODEL_STAGE2:='/models/3b dir'}\"" in env
    assert "高风险" in capsys.readouterr().out


def test_prepare_refuses_bad_data(tmp_path):
    data = make_official(tmp_path / "data")
    with open(data / "train.txt", "a", encoding="utf-8") as f:
        f.write("0_0.jpg\t中风险\n")  # conflicting duplicate
    args = build_parser().parse_args(["--data-dir", str(data), "--output-dir", str(tmp_path / "out")])
    from tools.dataset import DataError
    with pytest.raises(DataError, match=r"train.txt:21: 0_0.jpg listed again"):
        prepare(args)
    assert not (tmp_path / "out" / "data").exists()  # nothing written on bad data
