"""tools.report.ablation: the test scores of finished runs (augmentation off vs on) side by side."""
from __future__ import annotations

import numpy as np
import pytest

from tools.fileio import write_json, write_text
from tools.probs import write_probabilities, write_probs
from tools.report.ablation import main, run_scores, table
from tools.report.metrics import evaluate
from tools.task import HIGH_RISK_INDEX, LABEL_TO_INDEX, LABELS, Layout


def test_ablation_table_scores(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = [LABELS[i % 5] for i in range(20)]
    names = [f"t{i}.jpg" for i in range(20)]
    gold = [LABEL_TO_INDEX[lab] for lab in labels]
    runs = {}
    for run, aug in (("a", 0), ("b", 1)):
        layout = Layout(tmp_path / run)
        p1, p2 = rng.dirichlet(np.ones(5), 20), rng.dirichlet(np.ones(5), 20)
        write_text(layout.test_list, "".join(f"{n}\t{lab}\n" for n, lab in zip(names, labels)))  # as data-pre.sh
        write_json(layout.manifest, {"test_list": str(tmp_path / "B.txt"), "test_images": str(tmp_path / "B"),
                                     "counts": {"stage1_rows": dict.fromkeys(LABELS, 10 + aug)},
                                     **({"augmentation": {"counts": {"kept": dict.fromkeys(LABELS, 3)},
                                                          "seconds": 12.0}} if aug else {})})
        write_probs(layout.probs("stage1", "test"), names, p1)
        if aug:  # both stages and fusion
            write_probs(layout.probs("stage2", "test"), names, p2)
            write_probabilities(layout.probabilities, names, p1, p2[:, HIGH_RISK_INDEX], p2,
                                [LABELS[i] for i in p2.argmax(1)])
            write_json(layout.root / "ablation.json", {"seconds": 321.4})
        r = run_scores(layout.root)
        p1 = np.round(p1, 6)
        assert r["stage1"].weighted_f1 == pytest.approx(evaluate(gold, p1.argmax(1)).weighted_f1)
        assert r["stage1_rows"] == 50 + 5 * aug and r["copies"] == 15 * aug
        if aug:
            assert r["fused"].f1[0] == pytest.approx(evaluate(gold, p2.argmax(1)).f1[0])
            assert r["augment_seconds"] == 12.0 and r["seconds"] == 321.4
        else:
            assert r["fused"] is None and r["augment_seconds"] is None and r["seconds"] is None
        runs[run] = r
    lines = table(runs).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| a | 0 | 50 |") and lines[3].startswith("| b | 15 | 55 |")
    assert lines[2].endswith("| – | – | – | – |") and lines[3].endswith("| 12 | 321 |")
    assert main([f"off={tmp_path / 'a'}", f"on={tmp_path / 'b'}"]) == 0
    assert "| off | 0 | 50 |" in capsys.readouterr().out


def test_ablation_refusals(tmp_path, capsys):
    assert main([f"x={tmp_path / 'missing'}"]) == 1
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path)])  # not NAME=OUTPUT_DIR
    layout = Layout(tmp_path / "run")
    write_text(layout.test_list, "t0.jpg\t高风险\nt1.jpg\t无风险\n")
    write_json(layout.manifest, {"test_images": str(tmp_path), "counts": {"stage1_rows": {}}})
    write_probs(layout.probs("stage1", "test"), ["t1.jpg", "t0.jpg"], np.full((2, 5), 0.2))
    assert main([f"x={layout.root}"]) == 1
    assert "does not match the test list" in capsys.readouterr().err
