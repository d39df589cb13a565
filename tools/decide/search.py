"""Choose the fusion parameters (tools.decide.fusion) on validation predictions, guarded against overfitting.

    python -m tools.decide.search --output-dir outputs
    python -m tools.decide.search --stage1 outputs/stage1/val_probs.csv --stage2 outputs/stage2/val_probs.csv \
        --gold /data/ele/train.txt --output outputs/fusion.json [--folds 5 --repeats 3 --seed 42]

First the decisions (tools.decide.decisions, --decisions f1, the default): per-class offsets that maximise the
expected Σ w·F1 under stage 1's own probabilities on the images to be decided (the test set and these held-out
rows, no labels). Everything below starts from them: "identity" is stage 1 with those decisions, and the offsets
written are theirs plus the search's. The search also runs from plain argmax, and the start whose result
cross-validates better is kept (ties: the decisions). --decisions argmax starts from plain argmax only.

The validation set is small, so a free search would mostly fit its noise. The search is therefore coarse and
its complexity is chosen by cross-validation:

  * grid: beta in BETAS; per-class log-prior offsets from a small grid, found by coordinate ascent (a few
    sweeps over the classes, starting from zero offsets, a move kept only when it strictly raises Σ w·F1;
    ties go to the smaller |offset| and the smaller beta, so identity wins every tie);
  * settings, from simple to rich (SETTINGS): identity; beta only; beta + 高风险 offset; beta + all
    offsets on a ±0.5 grid; beta + all offsets on a ±1 grid;
  * each setting is fitted on K-1 folds (stratified by gold label, seeded) and scored on the held-out fold;
    the held-out predictions of all K folds are pooled into one out-of-fold prediction per image and scored
    with Σ w·F1 (F1 is not additive over folds, and small folds may miss a class entirely: pooling avoids
    both biases; `--cv-score mean` averages the per-fold scores instead). Repeats use fresh fold splits and
    the scores are averaged;
  * the setting with the best CV score wins (ties: the simpler one) and is refitted on the whole set;
  * shrinkage: unless that setting's CV gain over identity is positive, above --min-gain (default 0) and
    above --se-factor (default 1) bootstrap standard errors of the gain (the best of several noisy CV scores
    is optimistic, and Σ w·F1 on a few hundred images is noisy), the result is identity (beta 0, the starting
    offsets) -- fusion is then stage 1 alone, with its decisions. `--se-factor 0` keeps only "gain > 0".

The JSON (FusionParams.save) carries decision_offsets (the start; zeros for plain argmax), cv_weighted_f1,
identity_cv_weighted_f1 and n_val besides beta and offsets, plus the chosen setting and every setting's CV score,
for the record.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tools import cli
from tools.data.lists import read_list
from tools.data.split import stratified_folds
from tools.decide.decisions import f1_offsets
from tools.decide.fusion import FusionParams, features, fused_logits
from tools.fileio import DataError, read_json
from tools.probs import read_probs
from tools.report.metrics import weighted_f1
from tools.task import HIGH_RISK_INDEX, LABEL_TO_INDEX, LABELS, STAGES, Layout

N = len(LABELS)
BETAS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
# Up to ±2 nats: prior correction (tools.model.prior) already undoes the rebalanced rows' shares (up to ln 10 for
# 高风险), so the offsets only fine-tune; ±2 still covers what an uncorrected model (PRIOR_CORRECTION=0) needs.
OFFSETS_WIDE: tuple[float, ...] = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
OFFSETS_NARROW: tuple[float, ...] = (-0.5, 0.0, 0.5)


@dataclass(frozen=True)
class Setting:
    """One search space: which betas, which classes get an offset, from which grid."""
    name: str
    betas: tuple[float, ...] = (0.0,)
    offset_grid: tuple[float, ...] = (0.0,)
    offset_classes: tuple[int, ...] = ()
    sweeps: int = 3

    @property
    def is_identity(self) -> bool:
        return self.betas == (0.0,) and not self.offset_classes


SETTINGS: tuple[Setting, ...] = (
    Setting("identity"),
    Setting("beta", betas=BETAS),
    Setting("beta+high_offset", betas=BETAS, offset_grid=OFFSETS_WIDE, offset_classes=(HIGH_RISK_INDEX,)),
    Setting("beta+offsets_0.5", betas=BETAS, offset_grid=OFFSETS_NARROW, offset_classes=tuple(range(N))),
    Setting("beta+offsets_1", betas=BETAS, offset_grid=OFFSETS_WIDE, offset_classes=tuple(range(N))),
)


# ---------------------------------------------------------------------------------------------- objective

def predict_labels(log_p1: np.ndarray, logit2: np.ndarray, beta: float, offsets) -> np.ndarray:
    """argmax of tools.decide.fusion.fuse (softmax is monotone, so the logits' argmax is the same)."""
    return fused_logits(log_p1, logit2, beta, offsets).argmax(1)


# ---------------------------------------------------------------------------------------------- fitting

@dataclass
class Fit:
    params: FusionParams
    train_weighted_f1: float


def fit_setting(log_p1: np.ndarray, logit2: np.ndarray, gold: np.ndarray, setting: Setting) -> Fit:
    """The best params of `setting` on these rows: for each beta, coordinate ascent over the offsets."""
    gold = np.asarray(gold, dtype=int)
    grid = sorted(setting.offset_grid, key=lambda v: (abs(v), v))  # ties keep the smaller |offset|
    best_beta, best_offsets = 0.0, np.zeros(N)
    best = weighted_f1(gold, predict_labels(log_p1, logit2, 0.0, best_offsets))  # identity, the incumbent
    for beta in sorted(setting.betas):
        offsets = np.zeros(N)
        current = weighted_f1(gold, predict_labels(log_p1, logit2, beta, offsets))
        for _ in range(setting.sweeps if setting.offset_classes else 0):
            moved = False
            for c in setting.offset_classes:
                for value in grid:
                    if value == offsets[c]:
                        continue
                    trial = offsets.copy()
                    trial[c] = value
                    s = weighted_f1(gold, predict_labels(log_p1, logit2, beta, trial))
                    if s > current + 1e-12:
                        current, offsets, moved = s, trial, True
            if not moved:
                break
        if current > best + 1e-12:
            best, best_beta, best_offsets = current, beta, offsets
    params = FusionParams(beta=float(best_beta), offsets=[float(v) for v in best_offsets])
    return Fit(params, best)


@dataclass
class SearchResult:
    params: FusionParams
    setting: str  # the setting CV chose ("identity" also when shrinkage fell back to it)
    cv_weighted_f1: float  # CV score of the returned params' setting
    identity_cv_weighted_f1: float
    n_val: int
    folds: int
    repeats: int
    cv_by_setting: dict[str, float] = field(default_factory=dict)
    train_weighted_f1: float = 0.0  # of the returned params on the whole validation set
    identity_weighted_f1: float = 0.0  # stage 1 alone on the whole validation set
    shrunk: bool = False  # CV chose a richer setting, but its gain did not clear the guard
    cv_gain: float = 0.0  # best setting's CV score minus identity's
    cv_gain_se: float = 0.0  # bootstrap standard error of that gain
    decision_offsets: list[float] = field(default_factory=lambda: [0.0] * N)  # where the search started
    argmax_weighted_f1: float = 0.0  # stage 1's plain argmax on the whole validation set

    def extra(self) -> dict:
        return {"decision_offsets": self.decision_offsets, "argmax_val_weighted_f1": self.argmax_weighted_f1,
                "cv_weighted_f1": self.cv_weighted_f1, "identity_cv_weighted_f1": self.identity_cv_weighted_f1,
                "n_val": self.n_val, "setting": self.setting, "folds": self.folds, "repeats": self.repeats,
                "cv_by_setting": self.cv_by_setting, "val_weighted_f1": self.train_weighted_f1,
                "identity_val_weighted_f1": self.identity_weighted_f1, "shrunk": self.shrunk,
                "cv_gain": self.cv_gain, "cv_gain_se": self.cv_gain_se}


@dataclass
class CrossValidation:
    scores: dict[str, float]  # each setting's CV Σ w·F1, averaged over repeats
    oof: dict[str, np.ndarray]  # [repeats, N] out-of-fold predictions per setting


def cross_validate(log_p1: np.ndarray, logit2: np.ndarray, gold: np.ndarray, settings=SETTINGS, folds: int = 5,
                   repeats: int = 3, seed: int = 0, cv_score: str = "pooled") -> CrossValidation:
    """Each setting's held-out Σ w·F1, averaged over `repeats` seeded stratified K-fold splits."""
    if cv_score not in ("pooled", "mean"):
        raise ValueError(f"cv_score must be 'pooled' or 'mean', got {cv_score!r}")
    gold = np.asarray(gold, dtype=int)
    rng = np.random.default_rng(seed)
    totals = {s.name: 0.0 for s in settings}
    oofs = {s.name: np.empty((repeats, len(gold)), dtype=int) for s in settings}
    for r in range(repeats):
        fold = stratified_folds(gold, folds, rng)
        for setting in settings:
            oof = oofs[setting.name][r]
            per_fold = []
            for f in range(folds):
                held, fit_rows = fold == f, fold != f
                if not held.any():
                    continue
                if setting.is_identity or not fit_rows.any():
                    params = FusionParams.identity()
                else:
                    params = fit_setting(log_p1[fit_rows], logit2[fit_rows], gold[fit_rows], setting).params
                oof[held] = predict_labels(log_p1[held], logit2[held], params.beta, params.offsets)
                per_fold.append(weighted_f1(gold[held], oof[held]))
            totals[setting.name] += weighted_f1(gold, oof) if cv_score == "pooled" else float(np.mean(per_fold))
    return CrossValidation({name: total / repeats for name, total in totals.items()}, oofs)


def gain_standard_error(gold: np.ndarray, oof: np.ndarray, base: np.ndarray, n_boot: int = 200, seed: int = 0) -> float:
    """Bootstrap standard error (resampling images) of Σ w·F1(oof) - Σ w·F1(base), both [repeats, N] out-of-fold
    predictions, the gain averaged over the repeats as the CV score is."""
    gold = np.asarray(gold, dtype=int)
    rng = np.random.default_rng(seed)
    gains = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, len(gold), len(gold))
        gains[b] = np.mean([weighted_f1(gold[idx], o[idx]) - weighted_f1(gold[idx], o0[idx])
                            for o, o0 in zip(oof, base)])
    return float(gains.std(ddof=1))


def search(p1: np.ndarray, p2_high: np.ndarray, gold, *, settings=SETTINGS, folds: int = 5, repeats: int = 3,
           seed: int = 0, min_gain: float = 0.0, se_factor: float = 1.0, cv_score: str = "pooled",
           decision_offsets=None) -> SearchResult:
    """Fusion params for validation rows (p1 [N, 5], p2_high [N], gold label indices [N]), starting from stage 1
    with `decision_offsets` (default zeros: plain argmax); see the module doc."""
    log_p1, logit2 = features(p1, p2_high)
    gold = np.asarray(gold, dtype=int)
    if log_p1.shape != (len(gold), N) or logit2.shape != (len(gold),):
        raise ValueError(f"shapes differ: p1 {log_p1.shape}, p2 {logit2.shape}, gold {gold.shape}")
    base = np.zeros(N) if decision_offsets is None else np.asarray(decision_offsets, dtype=np.float64)
    argmax_val = weighted_f1(gold, log_p1.argmax(1))
    log_p1 = log_p1 + base  # the search's identity is stage 1 with these decisions
    start = dict(decision_offsets=[float(v) for v in base], argmax_weighted_f1=argmax_val)
    if not any(s.is_identity for s in settings):
        settings = (Setting("identity"), *settings)
    identity_name = next(s.name for s in settings if s.is_identity)
    identity_val = weighted_f1(gold, log_p1.argmax(1))
    identity = FusionParams(beta=0.0, offsets=[float(v) for v in base])
    k = min(folds, len(gold))
    if k < 2:  # nothing to cross-validate with: stage 1 alone (with its decisions)
        return SearchResult(identity, identity_name, identity_val, identity_val, len(gold), k, 0,
                            {identity_name: identity_val}, identity_val, identity_val, **start)
    cv = cross_validate(log_p1, logit2, gold, settings, k, repeats, seed, cv_score)
    best = identity_name
    for s in settings:  # simple to rich: a richer setting must do strictly better
        if cv.scores[s.name] > cv.scores[best] + 1e-12:
            best = s.name
    gain = cv.scores[best] - cv.scores[identity_name]
    se = gain_standard_error(gold, cv.oof[best], cv.oof[identity_name], seed=seed) if best != identity_name else 0.0
    # Shrinkage: the CV gain must be positive, above min_gain, and above se_factor standard errors (the best of
    # several noisy CV scores is optimistic; a gain within its own noise is not worth the risk).
    shrunk = best != identity_name and not gain > max(min_gain, se_factor * se, 0.0)
    common = dict(identity_cv_weighted_f1=cv.scores[identity_name], n_val=len(gold), folds=k, repeats=repeats,
                  cv_by_setting=cv.scores, identity_weighted_f1=identity_val, cv_gain=gain, cv_gain_se=se, **start)
    if best == identity_name or shrunk:
        return SearchResult(identity, identity_name, cv.scores[identity_name],
                            train_weighted_f1=identity_val, shrunk=shrunk, **common)
    fit = fit_setting(log_p1, logit2, gold, next(s for s in settings if s.name == best))
    params = FusionParams(beta=fit.params.beta, offsets=[float(b + o) for b, o in zip(base, fit.params.offsets)])
    return SearchResult(params, best, cv.scores[best], train_weighted_f1=fit.train_weighted_f1, **common)


# ---------------------------------------------------------------------------------------------- files

def load_validation(stage1: str | Path, stage2: str | Path, gold: str | Path
                    ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(names, p1 [N, 5], p2_high [N], gold indices [N]) in stage 1's row order, matched by image name.

    Every stage-1 image must have a stage-2 row and a gold label, and stage 2 must have no other images;
    the gold list may hold more (train.txt holds the training images too). Errors name the file and line.
    """
    stage1, stage2, gold = Path(stage1), Path(stage2), Path(gold)
    names1, p1 = read_probs(stage1)
    names2, p2 = read_probs(stage2)
    samples = read_list(gold, ".", labelled=True, check_images=False)
    labels = {s.name: s.label for s in samples}
    if not names1:
        raise DataError(f"{stage1}: no rows")
    row2 = {name: i for i, name in enumerate(names2)}
    for i, name in enumerate(names1):
        if name not in row2:
            raise DataError(f"{stage1}:{i + 2}: {name} has no row in {stage2}")
        if name not in labels:
            raise DataError(f"{stage1}:{i + 2}: {name} is not in the gold list {gold}")
    set1 = set(names1)
    for i, name in enumerate(names2):
        if name not in set1:
            raise DataError(f"{stage2}:{i + 2}: {name} has no row in {stage1}")
    p2_high = p2[[row2[name] for name in names1], HIGH_RISK_INDEX]
    gold_idx = np.array([LABEL_TO_INDEX[labels[name]] for name in names1])
    return names1, p1, p2_high, gold_idx


def tuning_inputs(layout: Layout) -> tuple[Path, Path, Path, str]:
    """(stage-1 CSV, stage-2 CSV, gold list, what they are) that test.sh tunes fusion on: with folds (FOLDS > 1)
    the pooled out-of-fold and validation predictions (tools.decide.oof), else the validation split's."""
    if not layout.manifest.exists():
        raise DataError(f"{layout.manifest}: not found: run data-pre.sh first")
    if int(read_json(layout.manifest).get("folds", 1)) > 1:
        return (layout.oof_probs(STAGES[0]), layout.oof_probs(STAGES[1]), layout.oof_gold,
                "the out-of-fold and validation predictions")
    return (layout.probs(STAGES[0], "val"), layout.probs(STAGES[1], "val"), layout.val_list,
            "the validation split")


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("tools.decide.search", __doc__)
    ap.add_argument("--output-dir", help="pipeline output folder: tune on what test.sh scored (the validation "
                                         "split, or with folds the pooled out-of-fold predictions), write fusion.json")
    ap.add_argument("--stage1", help="or: stage-1 probabilities (tools.model.score CSV) ...")
    ap.add_argument("--stage2", help="... stage-2 probabilities ...")
    ap.add_argument("--gold", help="... a name<TAB>label list covering those images (train.txt will do) ...")
    ap.add_argument("--output", help="... and the fusion JSON to write (for tools.decide.fuse --fusion-params)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="fresh K-fold splits, averaged (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--min-gain", type=float, default=0.0,
                    help="CV gain over stage 1 alone needed to keep fusion (default: %(default)s)")
    ap.add_argument("--se-factor", type=float, default=1.0,
                    help="CV gain must also exceed this many bootstrap standard errors (default: %(default)s)")
    ap.add_argument("--cv-score", choices=["pooled", "mean"], default="pooled",
                    help="score pooled out-of-fold predictions, or average per-fold scores (default: %(default)s)")
    ap.add_argument("--decisions", choices=["f1", "argmax"], default="f1",
                    help="start from offsets that maximise the expected weighted F1 under stage 1's probabilities "
                         "(f1), or from plain argmax (default: %(default)s; test.sh: $DECISIONS)")
    ap.add_argument("--unlabelled", action="append", default=[],
                    help="stage-1 probability CSV of images to be decided, for --decisions f1 (repeatable; with "
                         "--output-dir: the test set's); the tuning rows are always included")
    args = ap.parse_args(argv)
    if args.folds < 2 or args.repeats < 1:
        ap.error("--folds must be at least 2 and --repeats at least 1")
    explicit = (args.stage1, args.stage2, args.gold, args.output)
    if bool(args.output_dir) == any(explicit) or (not args.output_dir and not all(explicit)):
        ap.error("give either --output-dir or all of --stage1, --stage2, --gold and --output")
    try:
        if args.output_dir:
            layout = Layout(args.output_dir)
            stage1, stage2, gold_list, what = tuning_inputs(layout)
            output = layout.fusion_params
            if Path(gold_list).exists() and not Path(gold_list).read_text(encoding="utf-8").strip():
                raise DataError(f"{gold_list}: no held-out images to tune fusion on (VAL_RATIO=0?): give a "
                                "fusion file (FUSION_PARAMS=...) or split off a validation set")
            print(f"tuning fusion on {what}")
            test_probs = layout.probs(STAGES[0], "test")  # scored by test.sh before the search
            unlabelled = args.unlabelled or ([test_probs] if test_probs.exists() else [])
        else:
            stage1, stage2, gold_list, output = explicit
            unlabelled = args.unlabelled
        names, p1, p2_high, gold = load_validation(stage1, stage2, gold_list)
        decided = [read_probs(path)[1] for path in unlabelled] if args.decisions == "f1" else []
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    kwargs = dict(folds=args.folds, repeats=args.repeats, seed=args.seed, min_gain=args.min_gain,
                  se_factor=args.se_factor, cv_score=args.cv_score)
    result = search(p1, p2_high, gold, **kwargs)  # from plain argmax
    if args.decisions == "f1":
        decision_offsets = f1_offsets(np.vstack([p1, *decided]))
        print(f"decisions: offsets {[float(v) for v in decision_offsets]} maximise the expected weighted F1 of "
              f"stage 1 on {len(p1) + sum(len(d) for d in decided)} images (no labels used)")
        from_decisions = search(p1, p2_high, gold, decision_offsets=decision_offsets, **kwargs)
        # the decisions trust stage 1's calibration; the labelled held-out rows have the last word
        print(f"decisions: CV weighted F1 {from_decisions.cv_weighted_f1:.4f} starting from them, "
              f"{result.cv_weighted_f1:.4f} from plain argmax: "
              f"{'kept' if from_decisions.cv_weighted_f1 >= result.cv_weighted_f1 else 'not used'}")
        if from_decisions.cv_weighted_f1 >= result.cv_weighted_f1:
            result = from_decisions
    result.params.save(output, **result.extra())
    print(f"{result.n_val} validation images, {result.folds}-fold CV x {result.repeats} ({args.cv_score}):")
    for name, value in result.cv_by_setting.items():
        print(f"  {name:<18} CV weighted F1 {value:.4f}")
    if result.shrunk:
        verdict = (f"identity: the best setting's CV gain {result.cv_gain:+.4f} did not clear the guard "
                   f"(SE {result.cv_gain_se:.4f})")
    elif result.setting == "identity":
        verdict = "identity: no setting beat stage 1 alone in CV"
    else:
        verdict = f"chose {result.setting} (CV gain {result.cv_gain:+.4f}, SE {result.cv_gain_se:.4f})"
    print(f"{verdict}; beta {result.params.beta:g}, offsets {result.params.offsets}")
    print(f"validation weighted F1: stage 1 {result.argmax_weighted_f1:.4f}, with the decisions "
          f"{result.identity_weighted_f1:.4f}, fused {result.train_weighted_f1:.4f} (in-sample); "
          f"CV {result.identity_cv_weighted_f1:.4f} -> {result.cv_weighted_f1:.4f}")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
