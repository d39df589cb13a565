"""test.sh against a fake scorer (tests/helpers.py; every other step is the real tool): one scoring call for what
the runs need, then the out-of-fold pooling (FOLDS > 1), the fusion search, fusion, the submission check and,
with a labelled test list, the report. No model is loaded."""
from __future__ import annotations

import json

from tests.helpers import (fake_model, fake_trained, make_official, prepared, run_data_pre, run_script, score_calls,
                           tree_state, value)
from tools.decide.fusion import FusionParams
from tools.task import LABELS, STAGES, Layout


def test_test_sh_with_two_folds(tmp_path):
    out, layout = prepared(tmp_path, None, "--folds", "2")
    ckpts = fake_trained(layout, 2)

    log = run_script("test.sh", tmp_path, out, "--max_batch_size", "2")
    (call,) = score_calls(tmp_path)  # one scorer process for every model
    argv = call["argv"]
    assert value(argv, "--output-dir") == str(out) and argv[argv.index("--runs") + 1:argv.index("--runs") + 3] == [
        "final", "folds"]
    assert value(argv, "--batch-size") == "16"  # recipes/demo.env SCORE_BATCH_SIZE
    assert argv[argv.index("--"):] == ["--", "--max_pixels", "28224", "--max_batch_size", "2"]  # "$@" passed on
    expected = [[ckpts[("final", s)], [[str(layout.test_jsonl), str(layout.probs(s, "test"))],
                                       [str(layout.val_jsonl(s)), str(layout.probs(s, "val"))]]] for s in STAGES]
    expected += [[ckpts[(i, s)], [[str(layout.heldout_jsonl(i)), str(layout.probs(s, "heldout", i))]]]
                 for i in range(2) for s in STAGES]
    assert call["jobs"] == expected
    assert "pool out-of-fold and validation predictions done" in log
    assert "tuning fusion on the out-of-fold and validation predictions" in log
    fusion = json.loads(layout.fusion_params.read_text(encoding="utf-8"))
    assert fusion["n_val"] == 30  # 20 out-of-fold + 10 validation images
    assert len(layout.oof_gold.read_text(encoding="utf-8").splitlines()) == 30
    assert layout.submission.exists() and "OK: 5 images" in log
    assert not layout.report.exists()  # the test list has no labels

    # fusion parameters given: no search, so the fold models need not score
    params = tmp_path / "given.json"
    FusionParams(beta=0.0, offsets=[0, 0, 0, 0, 30.0]).save(params)
    layout.fusion_params.unlink()
    log = run_script("test.sh", tmp_path, out, FUSION_PARAMS=str(params))
    (call,) = score_calls(tmp_path)
    assert call["jobs"] == expected[:2] and "fusion search" not in log and not layout.fusion_params.exists()
    assert {line.split("\t")[1] for line in layout.submission.read_text(encoding="utf-8").splitlines()} == {"非楼道"}

    # a FOLDS that is not the split's fails before scoring
    log = run_script("test.sh", tmp_path, out, rc=1, FOLDS="3")
    assert "FOLDS=3, but data-pre.sh split the training data into 2 fold(s)" in log and score_calls(tmp_path) == []


def test_test_sh_without_folds(tmp_path):
    out, layout = prepared(tmp_path)
    ckpts = fake_trained(layout, 1)
    log = run_script("test.sh", tmp_path, out)
    (call,) = score_calls(tmp_path)
    assert call["argv"][call["argv"].index("--runs") + 1] == "final" and "folds" not in call["argv"]
    assert [c for c, _ in call["jobs"]] == [ckpts[("final", s)] for s in STAGES]
    assert "tuning fusion on the validation split" in log and "out-of-fold" not in log
    assert json.loads(layout.fusion_params.read_text(encoding="utf-8"))["n_val"] == 10
    assert not layout.folds_dir.exists() and not (layout.data_dir / "folds").exists()
    lines = layout.submission.read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in lines] == [f"t{i}.jpg" for i in range(5)]  # the test list's order


def test_test_sh_reports_on_a_labelled_test_list(tmp_path):
    data = make_official(tmp_path / "data", n_per_label=6)
    (data / "B.txt").write_text("".join(f"t{i}.jpg\t{label}\n" for i, label in enumerate(LABELS)), encoding="utf-8")
    out, layout = prepared(tmp_path)
    fake_trained(layout, 1)
    log = run_script("test.sh", tmp_path, out)
    assert "report done" in log and "stage 1 alone" in log and "weighted F1" in log
    assert layout.report.exists() and layout.confusion_png.exists() and layout.reliability_png.exists()


def test_test_sh_needs_train_sh(tmp_path):
    out, layout = prepared(tmp_path)
    log = run_script("test.sh", tmp_path, out, rc=1)
    for stage in STAGES:
        assert f"{stage} ({layout.run_dir(stage)}): no trained model recorded; run train.sh" in log
    assert "retrain (bash train.sh), or set ALLOW_STALE=1 to use them anyway" in log
    assert score_calls(tmp_path) == [] and not layout.submission.exists()
    # ALLOW_STALE=1 cannot conjure a model: the pointer is still missing
    log = run_script("test.sh", tmp_path, out, rc=1, ALLOW_STALE="1")
    assert "final_checkpoint.txt not found: run train.sh first" in log
    assert not layout.submission.exists()


def test_a_repeated_test_name_is_listed_once_with_a_warning(tmp_path):
    """11 list lines, one a repeat: never dropped silently. data-pre.sh and the submission check warn naming both
    lines; the submission has every image once, in the list's order, and passes validation."""
    data = make_official(tmp_path / "data", n_per_label=6)
    b = data / "B.txt"
    names = b.read_text(encoding="utf-8").split()
    b.write_text("\n".join([*names[:3], names[1], *names[3:]]) + "\n", encoding="utf-8")  # line 4 repeats line 2
    env = {"DATA_DIR": str(data), "AUGMENT": "0", "VAL_RATIO": "0.25", "OUTPUT_DIR": str(tmp_path / "out"),
           "MODEL_STAGE1": str(fake_model(tmp_path / "m1")), "MODEL_STAGE2": str(fake_model(tmp_path / "m2"))}
    warning = f"warning: {b}:4: {names[1]} listed again (first on {b}:2): kept once"
    assert warning in run_data_pre(env)
    out = tmp_path / "out"
    fake_trained(Layout(out))
    log = run_script("test.sh", tmp_path, out)
    assert warning in log and "OK: 5 images" in log
    lines = Layout(out).submission.read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in lines] == names

    # the same name with two labels cannot be kept once: refused, naming both lines, before anything is written
    b.write_text("".join(f"{n}\t{label}\n" for n, label in zip(names, LABELS)) + f"{names[0]}\t{LABELS[1]}\n",
                 encoding="utf-8")
    before = tree_state(out)
    log = run_data_pre(env, rc=1)
    assert f"{b}:6: {names[0]} listed again with label '{LABELS[1]}', but {b}:1 says '{LABELS[0]}'" in log
    assert {k: v for k, v in tree_state(out).items() if not k.startswith(".lock")} == {
        k: v for k, v in before.items() if not k.startswith(".lock")}
