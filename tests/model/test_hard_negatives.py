"""tools.model.hard_negatives: which images stage 1 confuses with 高风险, and the stage-2 rows they add."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import fake_trained, prepared
from tools.fileio import DataError, read_json, read_jsonl
from tools.model import checkpoint, hard_negatives
from tools.model.hard_negatives import hard_count, mine, pick, run_pool
from tools.probs import write_probs
from tools.state import run_fingerprint
from tools.task import BINARY_PROMPT, HIGH_RISK, LABELS, NOT_HIGH_RISK, PROMPT


class Scorer:
    """Writes p(高风险) from a table by image name (the rest spread evenly) and records its calls."""

    def __init__(self, p_high: dict[str, float], default: float = 0.1):
        self.p_high, self.default, self.calls = p_high, default, []

    def __call__(self, ckpt: Path, dataset: Path, output: Path) -> None:
        self.calls.append((ckpt, dataset, output))
        names = [Path(r["images"][0]).name for r in read_jsonl(dataset)]
        high = np.array([self.p_high.get(n, self.default) for n in names])
        probs = np.column_stack([high] + [(1 - high) / 4] * 4)
        write_probs(output, names, probs)


def images_of(rows: list[dict]) -> list[str]:
    return [Path(r["images"][0]).name for r in rows]


def test_pick_takes_the_highest_first_and_keeps_the_order_of_ties():
    assert pick(np.array([0.2, 0.9, 0.5, 0.9]), 3) == [1, 3, 2]
    assert pick(np.array([0.2, 0.9]), 0) == [] and pick(np.array([0.2, 0.9]), 5) == [1, 0]


def test_mine_adds_the_non_high_risk_images_stage_1_rates_most_high_risk(tmp_path):
    out, layout = prepared(tmp_path)
    ckpts = fake_trained(layout)
    pool = run_pool(layout, "final")
    others = [s for s in pool if s.label != HIGH_RISK]
    n_high = sum(s.label == HIGH_RISK for s in pool)
    assert hard_count(pool, 0.5) == round(0.5 * n_high) == 2
    # two confusions: a 中风险 and a 无风险 image; every 高风险 image scores highest of all and is not a candidate
    confused = {others[3].name: 0.8, others[-1].name: 0.6, **{s.name: 0.99 for s in pool if s.label == HIGH_RISK}}
    scorer = Scorer(confused)
    rows_path = mine(layout, "final", 0.5, scorer=scorer)

    (ckpt, dataset, _), = scorer.calls
    assert str(ckpt) == ckpts[("final", "stage1")]  # the same run's stage 1
    assert sorted(images_of(read_jsonl(dataset))) == sorted(s.name for s in others)  # no 高风险, no validation image
    base = read_jsonl(layout.train_jsonl("stage2"))
    rows = read_jsonl(rows_path)
    assert rows[:len(base)] == base  # the composed set as it is, then one row per hard negative
    extra = rows[len(base):]
    assert images_of(extra) == [others[3].name, others[-1].name]
    assert [r["messages"][-1]["content"] for r in extra] == [others[3].label, others[-1].label]  # their own labels
    assert all(r["messages"][0]["content"].endswith(PROMPT) for r in extra)
    record = read_json(layout.hard_negative_record())
    assert record["count"] == 2 and record["ratio"] == 0.5 and record["candidates"] == len(others)
    assert [p["image"] for p in record["picked"]] == images_of(extra) and record["picked"][0]["p_high"] == 0.8

    # the same stage 1 and ratio give the same bytes (the run's fingerprint holds them); another ratio does not
    before = rows_path.read_bytes()
    mine(layout, "final", 0.5, scorer=Scorer(confused))
    assert rows_path.read_bytes() == before
    mine(layout, "final", 1, scorer=Scorer(confused))
    assert len(read_jsonl(rows_path)) == len(base) + 4


def test_mine_for_a_fold_leaves_the_held_out_fold_out(tmp_path):
    out, layout = prepared(tmp_path, None, "--folds", "2")
    fake_trained(layout, folds=2)
    scorer = Scorer({})
    held = {Path(r["images"][0]).name for r in read_jsonl(layout.heldout_jsonl(0))}
    rows = read_jsonl(mine(layout, 0, 1, scorer=scorer))
    (ckpt, dataset, _), = scorer.calls
    assert ckpt == checkpoint.read_pointer(layout.run_dir("stage1", 0))
    scored = set(images_of(read_jsonl(dataset)))
    assert scored and not scored & held
    assert rows[:len(read_jsonl(layout.train_jsonl("stage2", 0)))] == read_jsonl(layout.train_jsonl("stage2", 0))
    assert layout.hard_negative_train_jsonl(0).parent == out / "folds" / "0" / "hard_negatives"


def test_mine_writes_the_specialists_own_answers(tmp_path):
    out, layout = prepared(tmp_path, compose_extra=("--stage2-target", "binary"))
    fake_trained(layout)
    rows = read_jsonl(mine(layout, "final", 0.5, scorer=Scorer({})))
    extra = rows[-2:]
    assert [r["messages"][-1]["content"] for r in extra] == [NOT_HIGH_RISK] * 2
    assert all(r["messages"][0]["content"].endswith(BINARY_PROMPT) for r in extra)
    cls = read_jsonl(mine(layout, "final", 0.5, "seq_cls", scorer=Scorer({})))
    assert [r["label"] for r in cls[-2:]] == [1, 1]  # 非高风险's index in the binary head
    assert cls[:-2] == read_jsonl(layout.train_jsonl("stage2", task="seq_cls"))


def test_mine_refuses_without_stage_1_or_with_no_ratio(tmp_path):
    out, layout = prepared(tmp_path)
    with pytest.raises(DataError, match="train stage 1 first, or set HARD_NEGATIVES=0"):
        mine(layout, "final", 1, scorer=Scorer({}))
    fake_trained(layout)
    with pytest.raises(DataError, match="give a number > 0"):
        mine(layout, "final", 0, scorer=Scorer({}))
    with pytest.raises(DataError, match="no such fold"):
        mine(layout, 3, 1, scorer=Scorer({}))


def test_the_default_scorer_is_test_shs(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("tools.model.shards.score_jobs_on_gpus",
                        lambda jobs, argv, batch_size, *a: seen.append((jobs, argv, batch_size)))
    score = hard_negatives.default_scorer(["--max_pixels", "3136"], 4)
    score(Path("ck"), Path("rows.jsonl"), Path("p.csv"))
    assert seen == [([(Path("ck"), [(Path("rows.jsonl"), Path("p.csv"))])], ["--max_pixels", "3136"], 4)]


def test_a_run_on_its_own_rows_records_them_and_their_shares(tmp_path):
    out, layout = prepared(tmp_path)
    fake_trained(layout)
    # stage 1 rates every 低风险 image highest: two extra 低风险 rows
    low = {s.name: 0.9 for s in run_pool(layout, "final") if s.label == LABELS[2]}
    rows_path = mine(layout, "final", 0.5, scorer=Scorer(low))
    work = checkpoint.start(layout, "stage2", "final", train_set=rows_path)
    record = read_json(work / "trained_on.json")
    assert record["train_set"] == str(rows_path.relative_to(out))
    rows = read_jsonl(rows_path)
    shares = dict(zip(record["class_shares"]["labels"], record["class_shares"]["trained"]))
    assert shares[LABELS[2]] == pytest.approx(sum(r["messages"][-1]["content"] == LABELS[2] for r in rows) / len(rows))
    # RESUME continues only on the same rows
    (work / "checkpoint-2").mkdir()
    assert checkpoint.latest(layout, "stage2", "final") == (work / "checkpoint-2").resolve()
    mine(layout, "final", 1, scorer=Scorer(low))
    assert checkpoint.latest(layout, "stage2", "final") is None
    with pytest.raises(DataError, match="data changed while this run trained"):
        checkpoint.finish(layout, "stage2", "final")
    # the composed set given as train_set is no set of its own
    plain = run_fingerprint(layout, read_json(layout.manifest), "stage2", "final",
                            train_set=layout.train_jsonl("stage2"))
    assert "train_set" not in plain["parts"]


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        hard_negatives.main(["--help"])
    assert e.value.code == 0 and "hard negatives" in capsys.readouterr().out
