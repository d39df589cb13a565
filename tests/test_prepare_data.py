"""Split, oversampling, the stage-2 set and the JSONL rows written for swift."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import write_image
from tools.dataset import Sample
from tools.prepare_data import build_parser, oversample, prepare, stage2_set, stratified_split
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
