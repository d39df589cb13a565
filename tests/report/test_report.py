"""tools.report.report against a hand-computed eight-image example, and its pictures."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tools.probs import write_probabilities
from tools.report.report import binary, build_report, main, reliability, write_report
from tools.task import HIGH_RISK_INDEX, LABELS, Layout

# image:        1   2   3   4   5   6   7   8
# gold:         高  高  高  中  中  低  无  非
# stage 1:      中  高  中  中  中  低  无  无     (errors: 1, 3, 8 -> 3)
# stage 2 高?:  yes yes no  no  yes no  no  no
# fused:        高  高  中  中  高  低  无  非     (errors: 3, 5 -> 2)
GOLD = [0, 0, 0, 1, 1, 2, 3, 4]
PRED1 = [1, 0, 1, 1, 1, 2, 3, 3]
HIGH2 = [1, 1, 0, 0, 1, 0, 0, 0]
PREDF = [0, 0, 1, 1, 0, 2, 3, 4]
CONF1 = [0.6, 0.6, 0.6, 0.9, 0.9, 0.9, 0.9, 0.4]  # stage 1's top-class confidence per image


def one_hot_probs(pred, conf):
    """Rows whose argmax is `pred` with probability `conf`, the rest spread evenly."""
    p = np.array([[(1 - c) / 4] * 5 for c in conf])
    p[np.arange(len(pred)), pred] = conf
    return p


P1 = one_hot_probs(PRED1, CONF1)
P2 = one_hot_probs([0 if h else 1 for h in HIGH2], [0.8] * 8)[:, HIGH_RISK_INDEX]  # stage 2's p(高风险): 0.8 or 0.05
PF = one_hot_probs(PREDF, [0.7] * 8)

# Stage 1:
#   高: tp 1 (img 2), predicted 1, gold 3 -> P 1, R 1/3, F1 2·(1/3)/(4/3) = 0.5
#   中: tp 2 (img 4, 5), predicted 4 (1, 3, 4, 5), gold 2 -> P 0.5, R 1, F1 2/3
#   低: tp 1, predicted 1, gold 1 -> F1 1
#   无: tp 1 (img 7), predicted 2 (7, 8), gold 1 -> P 0.5, R 1, F1 2/3
#   非: tp 0 -> F1 0
#   weighted: 2·0.5 + 1.5·2/3 + 1 + 2/3 + 0 = 11/3 = 3.6667
S1_F1 = [0.5, 2 / 3, 1.0, 2 / 3, 0.0]
S1_W = 11 / 3
# Fused:
#   高: predicted 1, 2, 5 -> tp 2, predicted 3, gold 3 -> P 2/3, R 2/3, F1 2/3
#   中: predicted 3, 4 -> tp 1, predicted 2, gold 2 -> F1 0.5
#   低: F1 1;  无: predicted 7 only -> F1 1;  非: predicted 8 -> F1 1
#   weighted: 2·2/3 + 1.5·0.5 + 1 + 1 + 1 = 61/12 = 5.0833
F_F1 = [2 / 3, 0.5, 1.0, 1.0, 1.0]
F_W = 61 / 12
# Deltas: weighted F1 61/12 - 44/12 = 17/12 = +1.4167; 高 F1 2/3 - 1/2 = +1/6 = +0.1667;
# errors 3 -> 2: reduction 1/3 = 33.3%.
# Stage 2 as 高 vs rest: predicted 高 (p >= 0.5) = {1, 2, 5}, gold 高 = {1, 2, 3}: tp 2 (1, 2), fp 1 (5), fn 1 (3),
#   tn 4 -> P 2/3, R 2/3, F1 2/3.
# AUC of p(高风险), ties half: stage 2 (0.8 for 1, 2, 5; 0.05 else): positives 1 and 2 beat negatives 4, 6, 7, 8 and
#   tie 5 (4.5 each), 3 ties 4, 6, 7, 8 (2) -> 11/15. Fused (0.7 / 0.075, the same calls): 11/15. Stage 1 (p 0.1,
#   0.6, 0.1 for 1-3; 0.025 for 4-7, 0.15 for 8): 1 and 3 beat 4 negatives (4 each), 2 beats all 5 -> 13/15.
# ECE of stage 1, 10 bins: bin 0.6-0.7 holds images 1-3 (confidence 0.6, accuracy 1/3): |1/3 - 0.6| · 3/8 = 0.1
#   bin 0.9-1.0 holds 4-7 (0.9, accuracy 1): 0.1 · 4/8 = 0.05;  bin 0.4-0.5 holds 8 (0.4, accuracy 0): 0.4 · 1/8 = 0.05
#   ECE = 0.2


def test_numbers_match_hand_computation():
    r = build_report(GOLD, P1, P2, PF)
    assert r.n == 8
    assert r.stage1.precision == pytest.approx([1.0, 0.5, 1.0, 0.5, 0.0])
    assert r.stage1.recall == pytest.approx([1 / 3, 1.0, 1.0, 1.0, 0.0])
    assert r.stage1.f1 == pytest.approx(S1_F1)
    assert r.stage1.weighted_f1 == pytest.approx(S1_W)
    assert r.fused.precision == pytest.approx([2 / 3, 0.5, 1.0, 1.0, 1.0])
    assert r.fused.recall == pytest.approx([2 / 3, 0.5, 1.0, 1.0, 1.0])
    assert r.fused.f1 == pytest.approx(F_F1)
    assert r.fused.weighted_f1 == pytest.approx(F_W)
    assert r.delta_weighted_f1 == pytest.approx(17 / 12)
    assert r.delta_high_f1 == pytest.approx(1 / 6)
    assert (r.errors_stage1, r.errors_fused) == (3, 2)
    assert r.error_reduction_pct == pytest.approx(100 / 3)
    b = r.stage2_high
    assert (b.tp, b.fp, b.fn, b.tn) == (2, 1, 1, 4)
    assert (b.precision, b.recall, b.f1) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert b.confusion.tolist() == [[2, 1], [1, 4]]
    assert r.auc == pytest.approx({"stage 1": 13 / 15, "stage 2": 11 / 15, "fused": 11 / 15})
    assert r.stage1.confusion[0].tolist() == [1, 2, 0, 0, 0]  # gold 高: one right, two called 中
    assert r.fused.confusion[1].tolist() == [1, 1, 0, 0, 0]  # gold 中: one called 高 by fusion
    assert r.reliability.ece == pytest.approx(0.2)
    assert r.reliability.count.tolist() == [0, 0, 0, 0, 1, 0, 3, 0, 0, 4]
    assert r.reliability.accuracy[6] == pytest.approx(1 / 3)


def test_edge_cases():
    # no error in stage 1: the reduction is undefined, not a division by zero
    p = one_hot_probs(GOLD, [0.9] * 8)
    assert build_report(GOLD, p, p[:, HIGH_RISK_INDEX], p).error_reduction_pct is None
    # one class only: no AUC (not a division by zero)
    assert build_report([1] * 8, p, p[:, HIGH_RISK_INDEX], p).auc == {"stage 1": None, "stage 2": None, "fused": None}
    # a confidence of exactly 1 falls in the last bin; binary F1 is 0 when nothing is found
    rel = reliability(np.eye(5)[[0, 1]], [0, 2])
    assert rel.count[-1] == 2 and rel.ece == pytest.approx(0.5)
    assert binary([True, False], [False, False]).f1 == 0.0
    with pytest.raises(ValueError, match="shape"):
        build_report(GOLD, P1[:5], P2, PF)
    with pytest.raises(ValueError, match=r"stage 2 probabilities have shape \(8, 5\), expected \(8,\)"):
        build_report(GOLD, P1, PF, PF)  # stage 2 gives p(高风险) only


def _assert_png(path, min_size):
    assert path.exists() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= min_size[0] and im.height >= min_size[1]
        im.load()  # fully decodes: not truncated


def test_write_report_markdown_and_pictures(tmp_path):
    write_report(tmp_path, GOLD, P1, P2, PF, source="hand example")
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| weighted F1 (max 6.5) | 3.667 | 5.083 | +1.417 |" in md
    assert "| 高风险 F1 | 0.500 | 0.667 | +0.167 |" in md
    assert "| errors (misclassified images) | 3 | 2 | -1 |" in md
    assert "**33.3%**" in md
    assert "| stage 2 | 0.733 | 0.667 | 0.667 | 0.667 |" in md  # AUC, P, R, F1
    assert "| stage 1 | 0.867 | 1.000 | 0.333 | 0.500 |" in md
    assert "| 高风险 | 2 | 1 |" in md and "| 其他 | 1 | 4 |" in md  # stage 2's 2×2
    assert "| 高风险 | 2 | 0.667 | 0.667 | 0.667 | 3 |" in md  # fused per-class row
    assert "| 高风险 | 1 | 2 | 0 | 0 | 0 |" in md  # stage 1 confusion row
    assert "**0.200**" in md  # ECE
    _assert_png(tmp_path / "confusion.png", (800, 400))
    _assert_png(tmp_path / "reliability.png", (400, 400))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_cli_reads_fuse_outputs(tmp_path, capsys):
    names = [f"t{i}.jpg" for i in range(8)]
    (tmp_path / "B.txt").write_text("".join(f"{n}\t{LABELS[g]}\n" for n, g in zip(names, GOLD)), encoding="utf-8")
    out = Layout(tmp_path / "out")
    out.data_dir.mkdir(parents=True)
    out.manifest.write_text(json.dumps({"test_list": str(tmp_path / "B.txt"), "test_images": str(tmp_path / "B")}),
                            encoding="utf-8")
    order = [7, 0, 6, 1, 5, 2, 4, 3]  # rows are matched to the gold list by name, not by position
    write_probabilities(out.probabilities, [names[i] for i in order], P1[order], P2[order], PF[order],
                        [LABELS[PREDF[i]] for i in order])
    assert main(["--output-dir", str(out.root)]) == 0
    assert "errors 3 -> 2 (reduction 33.3%)" in capsys.readouterr().out
    assert "| weighted F1 (max 6.5) | 3.667 | 5.083 | +1.417 |" in out.report.read_text(encoding="utf-8")
    _assert_png(out.root / "confusion.png", (800, 400))
    # an unlabelled test list cannot be scored: a clear error, exit 1
    (tmp_path / "B.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    assert main(["--output-dir", str(out.root)]) == 1
    assert "has no labels" in capsys.readouterr().err
    # an image the test list does not have: named with its line in probabilities.csv
    (tmp_path / "B.txt").write_text("".join(f"{n}\t{LABELS[g]}\n" for n, g in zip(names[1:], GOLD[1:])),
                                    encoding="utf-8")
    assert main(["--output-dir", str(out.root)]) == 1
    assert f"probabilities.csv:3: {names[0]} is not in the test list" in capsys.readouterr().err


def test_the_decision_offsets_share_of_the_change(tmp_path, capsys):
    """With fusion.json's decision offsets, the report says what stage 1 scores with them alone, so stage 2's share
    of the change is visible. An offset of +3 on 高风险 turns stage 1's calls of images 1, 3 (中 at 0.6, 高 at 0.1)
    and 8 (无 at 0.4, 高 at 0.15) into 高; images 4-7 (0.9) keep theirs. 高: tp 3, predicted 4, gold 3 -> F1 6/7;
    中, 低, 无 right (F1 1), 非 never called: weighted 2·6/7 + 1.5 + 1 + 1 = 5.214, against the fused 5.083."""
    offsets = [3.0, 0.0, 0.0, 0.0, 0.0]
    assert build_report(GOLD, P1, P2, PF, decision_offsets=offsets).decisions.weighted_f1 == pytest.approx(12 / 7 + 3.5)
    names = [f"t{i}.jpg" for i in range(8)]
    (tmp_path / "B.txt").write_text("".join(f"{n}\t{LABELS[g]}\n" for n, g in zip(names, GOLD)), encoding="utf-8")
    out = Layout(tmp_path / "out")
    out.data_dir.mkdir(parents=True)
    out.manifest.write_text(json.dumps({"test_list": str(tmp_path / "B.txt")}), encoding="utf-8")
    write_probabilities(out.probabilities, names, P1, P2, PF, [LABELS[i] for i in PREDF])
    out.fusion_params.write_text(json.dumps({"beta": 0.0, "offsets": offsets, "decision_offsets": offsets}),
                                 encoding="utf-8")
    assert main(["--output-dir", str(out.root)]) == 0
    assert "decision offsets alone (no stage 2): weighted F1 5.214, 高风险 F1 0.857; stage 2 and the search -0.131" \
        in capsys.readouterr().out
    assert "stage 2 and the fusion search add **-0.131**" in out.report.read_text(encoding="utf-8")
    out.fusion_params.write_text(json.dumps({"beta": 0.0, "offsets": [0.0] * 5}), encoding="utf-8")  # older file
    assert main(["--output-dir", str(out.root)]) == 0
    assert "decision offsets alone" not in capsys.readouterr().out
