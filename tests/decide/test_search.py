"""tools.decide.search: the cross-validated search for fusion parameters, on constructed examples; its inputs from
files and from a pipeline output folder (--output-dir)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tools.data import split
from tools.decide import search as search_module
from tools.decide.fusion import FusionParams, features, fuse
from tools.decide.search import SETTINGS, fit_setting, load_validation, main, predict_labels, search, tuning_inputs
from tools.fileio import DataError, write_json, write_text
from tools.probs import write_probs
from tools.report.metrics import weighted_f1
from tools.task import HIGH_RISK_INDEX, LABELS, Layout

PRIOR = np.array([0.15, 0.2, 0.15, 0.4, 0.1])


def under_confident_high(n: int, rng: np.random.Generator):
    """Stage 1 is systematically under-confident on 高风险; stage 2 is informative about it.

    logits = 2·onehot(gold) + N(0, 1), minus 1.5 on 高风险; p2 = sigmoid(z) with z ~ N(+2, 1) for 高, N(-2, 1) else.
    The Bayes rule is, halved, log p1_c + log(prior_c)/2 + [c = 高](1.5 + 2·logit p2): beta 2 and a positive 高
    offset, i.e. the optimum lies well away from identity.
    """
    gold = rng.choice(5, size=n, p=PRIOR)
    logits = rng.normal(0.0, 1.0, (n, 5))
    logits[np.arange(n), gold] += 2.0
    logits[:, HIGH_RISK_INDEX] -= 1.5
    p1 = np.exp(logits - logits.max(1, keepdims=True))
    p1 /= p1.sum(1, keepdims=True)
    z = np.where(gold == HIGH_RISK_INDEX, 2.0, -2.0) + rng.normal(0.0, 1.0, n)
    return p1, 1.0 / (1.0 + np.exp(-z)), gold


def confident_stage1_noise_stage2(n: int, rng: np.random.Generator):
    """Stage 1 is right 80% of the time, always 0.9 sure of its answer (the rest spread evenly), so no offset in
    the grid (|difference| <= 2 < log 36) can flip a decision; stage 2 is uniform noise, unrelated to gold."""
    gold = rng.choice(5, size=n, p=PRIOR)
    pred = np.where(rng.uniform(size=n) < 0.8, gold, (gold + rng.integers(1, 5, n)) % 5)
    p1 = np.full((n, 5), 0.025)
    p1[np.arange(n), pred] = 0.9
    return p1, rng.uniform(size=n), gold


def test_identity_params_return_stage1_labels():
    rng = np.random.default_rng(0)
    p1, p2, gold = under_confident_high(200, rng)
    identity = FusionParams.identity()
    assert identity.beta == 0.0 and identity.offsets == [0.0] * 5
    assert (fuse(p1, p2, identity).argmax(1) == p1.argmax(1)).all()
    log_p1, logit2 = features(p1, p2)
    assert (predict_labels(log_p1, logit2, 0.0, np.zeros(5)) == p1.argmax(1)).all()
    # the search's argmax shortcut agrees with tools.decide.fusion.fuse for non-trivial params too
    params = FusionParams(beta=1.5, offsets=[0.5, -0.5, 0.0, 1.0, 0.0])
    assert (predict_labels(log_p1, logit2, params.beta, params.offsets) == fuse(p1, p2, params).argmax(1)).all()


def test_fit_never_worse_than_identity_in_sample():
    rng = np.random.default_rng(2)
    p1, p2, gold = under_confident_high(150, rng)
    log_p1, logit2 = features(p1, p2)
    base = weighted_f1(gold, p1.argmax(1))
    for setting in SETTINGS:
        fit = fit_setting(log_p1, logit2, gold, setting)
        assert fit.train_weighted_f1 >= base
        assert fit.train_weighted_f1 == pytest.approx(
            weighted_f1(gold, predict_labels(log_p1, logit2, fit.params.beta, fit.params.offsets)))


@pytest.mark.parametrize("seed", [0, 1])
def test_search_recovers_the_known_gain(seed):
    rng = np.random.default_rng(seed)
    p1, p2, gold = under_confident_high(300, rng)
    result = search(p1, p2, gold, folds=5, repeats=2, seed=seed)
    # CV prefers fusion, by a wide margin, and the params move the way the construction says they should
    assert result.setting != "identity" and not result.shrunk
    assert result.cv_weighted_f1 > result.identity_cv_weighted_f1 + 0.5
    assert result.params.beta >= 1.0 and result.params.offsets[HIGH_RISK_INDEX] >= 0.0
    # out of sample, the found params recover (nearly all of) the gain the Bayes-like rule achieves
    tp1, tp2, tgold = under_confident_high(5000, rng)
    stage1 = weighted_f1(tgold, tp1.argmax(1))
    found = weighted_f1(tgold, fuse(tp1, tp2, result.params).argmax(1))
    bayes_like = weighted_f1(tgold, fuse(tp1, tp2, FusionParams(beta=2.0, offsets=[1.0, 0, 0, 0, 0])).argmax(1))
    assert bayes_like > stage1 + 0.8  # the construction really leaves a large gain on the table
    assert found - stage1 >= 0.8 * (bayes_like - stage1)  # 0.91-1.03 over seeds 0-19


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_stage2_gives_identity(seed):
    rng = np.random.default_rng(seed)
    p1, p2, gold = confident_stage1_noise_stage2(200, rng)
    result = search(p1, p2, gold, folds=5, repeats=2, seed=seed)
    assert result.params == FusionParams.identity()
    assert result.setting == "identity"
    assert result.cv_weighted_f1 == result.identity_cv_weighted_f1
    assert max(result.cv_by_setting.values()) == result.cv_by_setting["identity"]  # nothing beat stage 1 alone


def test_shrinkage_when_gain_is_not_large_enough():
    rng = np.random.default_rng(3)
    p1, p2, gold = under_confident_high(200, rng)
    result = search(p1, p2, gold, folds=4, repeats=1, seed=0, min_gain=10.0)  # no gain can exceed 10
    assert result.shrunk and result.params == FusionParams.identity()
    assert result.cv_gain > 0.3  # CV did see a gain; the guard refused it anyway


def test_search_is_deterministic_given_seed():
    rng = np.random.default_rng(4)
    p1, p2, gold = under_confident_high(120, rng)
    a = search(p1, p2, gold, folds=3, repeats=2, seed=7)
    b = search(p1, p2, gold, folds=3, repeats=2, seed=7)
    assert a.params == b.params and a.cv_by_setting == b.cv_by_setting and a.cv_gain_se == b.cv_gain_se


def _write_validation(tmp_path, n=60, seed=5):
    rng = np.random.default_rng(seed)
    p1, p2, gold = under_confident_high(n, rng)
    names = [f"v{i:03d}.jpg" for i in range(n)]
    stage2 = np.zeros((n, 5))
    stage2[:, HIGH_RISK_INDEX] = p2
    stage2[:, 1] = 1 - p2
    order = rng.permutation(n)  # stage 2 in another order: rows are matched by name
    write_probs(tmp_path / "s1.csv", names, p1)
    write_probs(tmp_path / "s2.csv", [names[i] for i in order], stage2[order])
    lines = [f"{name}\t{LABELS[g]}" for name, g in zip(names, gold)] + ["train_only.jpg\t无风险"]
    (tmp_path / "train.txt").write_text("\n".join(lines[::-1]) + "\n", encoding="utf-8")
    return names, p1, p2, gold


def test_load_validation_matches_by_name(tmp_path):
    names, p1, p2, gold = _write_validation(tmp_path)
    got_names, got_p1, got_p2, got_gold = load_validation(tmp_path / "s1.csv", tmp_path / "s2.csv",
                                                          tmp_path / "train.txt")
    assert got_names == names and (got_gold == gold).all()
    np.testing.assert_allclose(got_p1, p1, atol=1e-6)
    np.testing.assert_allclose(got_p2, p2, atol=1e-6)


def test_cli_writes_params_with_cv_record(tmp_path, capsys):
    _write_validation(tmp_path)
    out = tmp_path / "fusion.json"
    rc = main(["--stage1", str(tmp_path / "s1.csv"), "--stage2", str(tmp_path / "s2.csv"),
               "--gold", str(tmp_path / "train.txt"), "--output", str(out), "--folds", "3", "--repeats", "1"])
    assert rc == 0
    params = FusionParams.load(out)  # tools.decide.fuse can read it
    raw = json.loads(out.read_text(encoding="utf-8"))
    assert raw["n_val"] == 60
    assert raw["identity_cv_weighted_f1"] <= raw["cv_weighted_f1"]
    assert (params == FusionParams.identity()) == (raw["setting"] == "identity")
    assert "wrote" in capsys.readouterr().out


def test_cli_names_file_and_line_on_mismatch(tmp_path, capsys):
    names, *_ = _write_validation(tmp_path)
    args = ["--stage1", str(tmp_path / "s1.csv"), "--stage2", str(tmp_path / "s2.csv"),
            "--gold", str(tmp_path / "train.txt"), "--output", str(tmp_path / "f.json")]
    gold_lines = (tmp_path / "train.txt").read_text(encoding="utf-8").splitlines()
    # an image with predictions but no gold label: stage-1 CSV line 4 (header is line 1) holds names[2]
    (tmp_path / "train.txt").write_text("\n".join(l for l in gold_lines if not l.startswith(names[2])) + "\n",
                                        encoding="utf-8")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"s1.csv:4: {names[2]} is not in the gold list" in err
    # a stage-2 image stage 1 never scored
    (tmp_path / "train.txt").write_text("\n".join(gold_lines) + "\n", encoding="utf-8")
    with open(tmp_path / "s2.csv", "a", encoding="utf-8") as f:
        f.write("stray.jpg,0.5,0.5,0,0,0\n")
    assert main(args) == 1
    assert "s2.csv:62: stray.jpg has no row in" in capsys.readouterr().err
    assert not (tmp_path / "f.json").exists()


def test_the_cross_validation_deals_folds_with_the_one_dealer():
    assert search_module.stratified_folds is split.stratified_folds


# --------------------------------------------------------------------------- --output-dir: what test.sh tunes on
def output_with_validation(tmp_path, folds=1):
    """An output folder after scoring: the manifest, the validation split and both stages' validation CSVs."""
    names, p1, p2, gold = _write_validation(tmp_path)
    layout = Layout(tmp_path / "out")
    write_json(layout.manifest, {"folds": folds})
    write_text(layout.val_list, (tmp_path / "train.txt").read_text(encoding="utf-8"))
    for stage, csv in (("stage1", "s1.csv"), ("stage2", "s2.csv")):
        layout.probs(stage, "val").parent.mkdir(parents=True)
        layout.probs(stage, "val").write_bytes((tmp_path / csv).read_bytes())
    return layout


def test_tuning_inputs_follow_the_folds(tmp_path):
    layout = Layout(tmp_path / "out")
    with pytest.raises(DataError, match="manifest.json: not found: run data-pre.sh first"):
        tuning_inputs(layout)
    write_json(layout.manifest, {"folds": 1})
    assert tuning_inputs(layout) == (layout.probs("stage1", "val"), layout.probs("stage2", "val"), layout.val_list,
                                     "the validation split")
    write_json(layout.manifest, {"folds": 3})
    assert tuning_inputs(layout) == (layout.oof_probs("stage1"), layout.oof_probs("stage2"), layout.oof_gold,
                                     "the out-of-fold and validation predictions")


def test_cli_output_dir_writes_fusion_json(tmp_path, capsys):
    layout = output_with_validation(tmp_path)
    assert main(["--output-dir", str(layout.root), "--folds", "3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "tuning fusion on the validation split" in out and f"wrote {layout.fusion_params}" in out
    explicit = tmp_path / "explicit.json"
    assert main(["--stage1", str(tmp_path / "s1.csv"), "--stage2", str(tmp_path / "s2.csv"), "--gold",
                 str(tmp_path / "train.txt"), "--output", str(explicit), "--folds", "3", "--repeats", "1"]) == 0
    assert json.loads(layout.fusion_params.read_text(encoding="utf-8")) == json.loads(explicit.read_text("utf-8"))
    assert json.loads(explicit.read_text(encoding="utf-8"))["n_val"] == 60


def test_cli_output_dir_refusals(tmp_path, capsys):
    layout = output_with_validation(tmp_path)
    write_text(layout.val_list, "")  # VAL_RATIO=0: nothing held out
    assert main(["--output-dir", str(layout.root)]) == 1
    assert "no held-out images to tune fusion on" in capsys.readouterr().err and not layout.fusion_params.exists()
    write_json(layout.manifest, {"folds": 2})  # folds, but tools.decide.oof has not pooled them
    assert main(["--output-dir", str(layout.root)]) == 1
    assert "oof_stage1.csv: not found" in capsys.readouterr().err
    for argv in ([], ["--output-dir", str(layout.root), "--stage1", "x.csv"],
                 ["--stage1", "x.csv", "--stage2", "y.csv"], ["--output-dir", str(layout.root), "--folds", "1"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
