"""Report on a labelled test set: stage 1 alone, stage 2 alone (高风险 vs rest) and fused, as Markdown and PNGs.

    python -m tools.report.report --output-dir outputs [--probabilities P.csv] [--test-list B.txt]

Reads <output-dir>/probabilities.csv (tools.decide.fuse) and the gold labels of the test list named in
<output-dir>/data/manifest.json, and writes atomically into <output-dir>:
  report.md        weighted F1, per-class precision/recall/F1 and confusion matrix for stage 1 and fused;
                   stage 2 as a 高风险 detector (AUC of p(高风险), its calls at p >= 0.5) beside stage 1 and
                   the fusion; the deltas fused - stage 1 in weighted F1 and 高风险 F1, and the reduction in
                   misclassified images; stage 1's ECE
  confusion.png    stage-1 and fused confusion matrices side by side, with counts
  reliability.png  reliability diagram of stage 1's top-class confidence (10 bins), ECE in the title
Pictures use ASCII class names (default fonts lack Chinese glyphs); the Markdown keeps the labels.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tools import cli
from tools.data.lists import read_list
from tools.fileio import DataError, atomic_open, read_json, write_text
from tools.probs import read_probabilities
from tools.report.metrics import WEIGHTS, Evaluation, evaluate, offset_labels, roc_auc
from tools.task import HIGH_RISK, HIGH_RISK_INDEX, LABEL_TO_INDEX, LABELS, MAX_SCORE, Layout

SHORT_NAMES: tuple[str, ...] = ("High", "Medium", "Low", "None", "NotCorridor")  # LABELS order, for pictures
N_BINS = 10


@dataclass(frozen=True)
class Binary:
    """One class against the rest: counts, precision, recall, F1 (0 where undefined)."""
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp else 0.0

    @property
    def confusion(self) -> np.ndarray:
        """[[tp, fn], [fp, tn]]: rows gold (class, rest), columns predicted (class, rest)."""
        return np.array([[self.tp, self.fn], [self.fp, self.tn]])


def binary(gold_pos, pred_pos) -> Binary:
    g, p = np.asarray(gold_pos, dtype=bool), np.asarray(pred_pos, dtype=bool)
    return Binary(int((g & p).sum()), int((~g & p).sum()), int((g & ~p).sum()), int((~g & ~p).sum()))


@dataclass(frozen=True)
class Reliability:
    """Per confidence bin [k/10, (k+1)/10) (the last bin includes 1): count, mean confidence, accuracy."""
    count: np.ndarray
    confidence: np.ndarray  # NaN in empty bins
    accuracy: np.ndarray  # NaN in empty bins
    ece: float  # Σ_bins count/N · |accuracy - confidence|


def reliability(probs: np.ndarray, gold, n_bins: int = N_BINS) -> Reliability:
    probs, gold = np.asarray(probs, dtype=np.float64), np.asarray(gold, dtype=int)
    conf = probs.max(1)
    correct = (probs.argmax(1) == gold).astype(float)
    idx = np.clip(np.floor(conf * n_bins + 1e-9).astype(int), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(idx, conf, n_bins) / count
        accuracy = np.bincount(idx, correct, n_bins) / count
    filled = count > 0
    ece = float((count[filled] / max(1, len(gold)) * np.abs(accuracy[filled] - confidence[filled])).sum())
    return Reliability(count, confidence, accuracy, ece)


@dataclass(frozen=True)
class Report:
    n: int
    stage1: Evaluation
    fused: Evaluation
    stage2_high: Binary  # stage 2's p(高风险) >= 0.5, against gold == 高风险
    stage1_high: Binary  # stage 1's and the fused argmax == 高风险, for comparison
    fused_high: Binary
    reliability: Reliability  # stage 1's top-class confidence
    auc: dict  # 高风险-vs-rest ROC AUC of p(高风险): stage 1, stage 2, fused (None when a class is absent)
    decisions: Evaluation | None = None  # stage 1 with fusion.json's decision offsets alone (no stage 2, no search)

    @property
    def errors_stage1(self) -> int:
        return self.n - int(np.trace(self.stage1.confusion))

    @property
    def errors_fused(self) -> int:
        return self.n - int(np.trace(self.fused.confusion))

    @property
    def error_reduction_pct(self) -> float | None:
        """(errors stage 1 - errors fused) / errors stage 1, in %; None when stage 1 made no error."""
        if self.errors_stage1 == 0:
            return None
        return 100.0 * (self.errors_stage1 - self.errors_fused) / self.errors_stage1

    @property
    def delta_weighted_f1(self) -> float:
        return self.fused.weighted_f1 - self.stage1.weighted_f1

    @property
    def delta_high_f1(self) -> float:
        return float(self.fused.f1[HIGH_RISK_INDEX] - self.stage1.f1[HIGH_RISK_INDEX])


def build_report(gold, p1: np.ndarray, p2_high: np.ndarray, fused: np.ndarray, decision_offsets=None) -> Report:
    """All the numbers, from gold label indices [N], stage 1's and the fused [N, 5] probabilities and stage 2's
    [N] p(高风险) (a five-label or a binary specialist alike: it calls 高风险 at p >= 0.5); with the fusion's
    decision offsets (tools.decide.decisions) also stage 1 with those alone, to show what stage 2 adds."""
    gold = np.asarray(gold, dtype=int)
    p1, p2_high, fused = (np.asarray(a, dtype=np.float64) for a in (p1, p2_high, fused))
    for name, a, shape in (("stage 1", p1, (len(gold), len(LABELS))), ("stage 2", p2_high, (len(gold),)),
                           ("fused", fused, (len(gold), len(LABELS)))):
        if a.shape != shape:
            raise ValueError(f"{name} probabilities have shape {a.shape}, expected {shape}")
    pred1, predf = p1.argmax(1), fused.argmax(1)
    gold_high = gold == HIGH_RISK_INDEX
    auc = {"stage 1": roc_auc(gold_high, p1[:, HIGH_RISK_INDEX]), "stage 2": roc_auc(gold_high, p2_high),
           "fused": roc_auc(gold_high, fused[:, HIGH_RISK_INDEX])}
    return Report(n=len(gold), stage1=evaluate(gold, pred1), fused=evaluate(gold, predf),
                  stage2_high=binary(gold_high, p2_high >= 0.5),
                  stage1_high=binary(gold_high, pred1 == HIGH_RISK_INDEX),
                  fused_high=binary(gold_high, predf == HIGH_RISK_INDEX), reliability=reliability(p1, gold), auc=auc,
                  decisions=None if decision_offsets is None else evaluate(
                      gold, offset_labels(p1, decision_offsets)))


# ---------------------------------------------------------------------------------------------- Markdown

def _signed(v: float, digits: int = 3) -> str:
    return f"{v:+.{digits}f}"


def _scores_md(s: Evaluation) -> list[str]:
    lines = [f"Weighted F1 **{s.weighted_f1:.3f}** / {MAX_SCORE:g}, accuracy {s.accuracy:.3f}.", "",
             "| label | weight | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|---:|"]
    for i, label in enumerate(LABELS):
        lines.append(f"| {label} | {WEIGHTS[i]:g} | {s.precision[i]:.3f} | {s.recall[i]:.3f} | {s.f1[i]:.3f} | "
                     f"{int(s.confusion[i].sum())} |")
    lines += ["", "Confusion matrix (rows gold, columns predicted):", "",
              "| gold \\ predicted | " + " | ".join(LABELS) + " |", "|---|" + "---:|" * len(LABELS)]
    for i, label in enumerate(LABELS):
        lines.append(f"| {label} | " + " | ".join(str(int(v)) for v in s.confusion[i]) + " |")
    return lines


def render_markdown(r: Report, source: str = "", unreadable: dict[str, str] | None = None) -> str:
    h = HIGH_RISK
    reduction = "n/a (stage 1 made no error)" if r.error_reduction_pct is None else f"{r.error_reduction_pct:.1f}%"
    lines = ["# Test-set report", "",
             f"{r.n} images{(' — ' + source) if source else ''}.", "",
             "## Summary", "",
             "| | stage 1 | fused | fused − stage 1 |", "|---|---:|---:|---:|",
             f"| weighted F1 (max {MAX_SCORE:g}) | {r.stage1.weighted_f1:.3f} | {r.fused.weighted_f1:.3f} | "
             f"{_signed(r.delta_weighted_f1)} |",
             f"| {h} F1 | {r.stage1.f1[HIGH_RISK_INDEX]:.3f} | {r.fused.f1[HIGH_RISK_INDEX]:.3f} | "
             f"{_signed(r.delta_high_f1)} |",
             f"| accuracy | {r.stage1.accuracy:.3f} | {r.fused.accuracy:.3f} | "
             f"{_signed(r.fused.accuracy - r.stage1.accuracy)} |",
             f"| errors (misclassified images) | {r.errors_stage1} | {r.errors_fused} | "
             f"{_signed(r.errors_fused - r.errors_stage1, 0)} |", "",
             f"Error reduction (fused vs stage 1): **{reduction}** of stage 1's misclassified images.", ""]
    if r.decisions is not None:
        d = r.decisions
        lines += [f"Where the change comes from: stage 1 with the fusion's decision offsets alone (no stage 2) scores "
                  f"weighted F1 **{d.weighted_f1:.3f}** ({_signed(d.weighted_f1 - r.stage1.weighted_f1)}), {h} F1 "
                  f"{d.f1[HIGH_RISK_INDEX]:.3f}; stage 2 and the fusion search add "
                  f"**{_signed(r.fused.weighted_f1 - d.weighted_f1)}**.", ""]
    lines += [
             "## Stage 1 alone", "", *_scores_md(r.stage1), "",
             f"## {h} vs rest: the specialist beside stage 1 and the fusion", "",
             f"AUC ranks the images by p({h}) (threshold-free); stage 2 calls {h} at p({h}) >= 0.5, stage 1 "
             f"and the fusion when {h} is their argmax.", "",
             "| | AUC | precision | recall | F1 |", "|---|---:|---:|---:|---:|"]
    for name, b in (("stage 2", r.stage2_high), ("stage 1", r.stage1_high), ("fused", r.fused_high)):
        auc = r.auc.get(name)
        lines.append(f"| {name} | {'–' if auc is None else f'{auc:.3f}'} | {b.precision:.3f} | {b.recall:.3f} | "
                     f"{b.f1:.3f} |")
    b = r.stage2_high
    lines += ["", "Stage 2 confusion (rows gold, columns predicted):", "",
              f"| gold \\ predicted | {h} | 其他 |", "|---|---:|---:|",
              f"| {h} | {b.tp} | {b.fn} |", f"| 其他 | {b.fp} | {b.tn} |", "",
              "## Fused", "", *_scores_md(r.fused), "",
              "## Stage-1 calibration", "",
              f"Expected calibration error (top-class confidence, {len(r.reliability.count)} bins): "
              f"**{r.reliability.ece:.3f}**.", "",
              "| confidence bin | images | mean confidence | accuracy |", "|---|---:|---:|---:|"]
    n_bins = len(r.reliability.count)
    for k in range(n_bins):
        c = int(r.reliability.count[k])
        if c:
            lines.append(f"| {k / n_bins:.1f}–{(k + 1) / n_bins:.1f} | {c} | {r.reliability.confidence[k]:.3f} | "
                         f"{r.reliability.accuracy[k]:.3f} |")
    if unreadable:
        lines += ["", "## Unreadable test images", "",
                  f"{len(unreadable)} test image(s) could not be read; they got the fallback label (the training "
                  "split's most common) and count in the scores above:", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in sorted(unreadable.items())]
    lines += ["", "![confusion matrices](confusion.png)", "", "![stage-1 reliability](reliability.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- pictures

def _save_png(fig, path: str | Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # Agg, whatever the configured backend; no pyplot state
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)


def plot_confusion(cm_stage1: np.ndarray, cm_fused: np.ndarray, path: str | Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    vmax = max(int(np.max(cm_stage1)), int(np.max(cm_fused)), 1)
    for ax, cm, title in ((axes[0], cm_stage1, "Stage 1"), (axes[1], cm_fused, "Fused")):
        cm = np.asarray(cm)
        im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=vmax)
        acc = np.trace(cm) / max(1, cm.sum())
        ax.set_title(f"{title} (accuracy {acc:.3f})")
        ax.set_xticks(range(len(SHORT_NAMES)), SHORT_NAMES, rotation=30, ha="right")
        ax.set_yticks(range(len(SHORT_NAMES)), SHORT_NAMES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                        color="white" if cm[i, j] > vmax / 2 else "black")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="images")
    _save_png(fig, path)


def plot_reliability(rel: Reliability, path: str | Path) -> None:
    from matplotlib.figure import Figure

    n_bins = len(rel.count)
    edges = np.linspace(0, 1, n_bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    filled = rel.count > 0
    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.bar(centers[filled], rel.accuracy[filled], width=1 / n_bins, edgecolor="black", color="tab:blue",
           alpha=0.8, label="accuracy")
    ax.bar(centers[filled], rel.confidence[filled] - rel.accuracy[filled], bottom=rel.accuracy[filled],
           width=1 / n_bins, edgecolor="red", color="tab:red", alpha=0.25, hatch="//", label="gap to confidence")
    for x, y, c in zip(centers[filled], rel.accuracy[filled], rel.count[filled]):
        ax.text(x, min(y, 0.95) + 0.02, f"n={int(c)}", ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("stage-1 top-class confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Stage 1 reliability (ECE = {rel.ece:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    _save_png(fig, path)


def write_report(output_dir: str | Path, gold, p1: np.ndarray, p2: np.ndarray, fused: np.ndarray,
                 source: str = "", decision_offsets=None) -> Report:
    """Compute the numbers and write report.md, confusion.png and reliability.png into output_dir. Unreadable
    test images (the manifest's bad_test_images) get their own section."""
    layout = Layout(output_dir)
    report = build_report(gold, p1, p2, fused, decision_offsets)
    unreadable = read_json(layout.manifest).get("bad_test_images") if layout.manifest.exists() else None
    plot_confusion(report.stage1.confusion, report.fused.confusion, layout.confusion_png)
    plot_reliability(report.reliability, layout.reliability_png)
    write_text(layout.report, render_markdown(report, source, unreadable))
    return report


# ---------------------------------------------------------------------------------------------- files

def load_inputs(output_dir: str | Path, probabilities: str | Path | None = None, test_list: str | Path | None = None
                ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """(names, gold, p1, p2, fused, source description), rows matched to the gold list by image name."""
    layout = Layout(output_dir)
    prob_path = Path(probabilities) if probabilities else layout.probabilities
    if test_list is None:
        if not layout.manifest.exists():
            raise DataError(f"{layout.manifest}: not found (run data-pre.sh first, or pass --test-list)")
        test_list = read_json(layout.manifest)["test_list"]
    samples = read_list(test_list, ".", labelled=None, check_images=False, progress=False)
    if samples[0].label is None:
        raise DataError(f"{test_list}: the test list has no labels, so there is nothing to score")
    gold_of = {s.name: LABEL_TO_INDEX[s.label] for s in samples}
    names, p1, p2, fused = read_probabilities(prob_path)
    for lineno, name in enumerate(names, 2):
        if name not in gold_of:
            raise DataError(f"{prob_path}:{lineno}: {name} is not in the test list {test_list}")
    if len(set(names)) != len(names):
        dup = next(n for i, n in enumerate(names) if n in names[:i])
        raise DataError(f"{prob_path}:{names.index(dup, names.index(dup) + 1) + 2}: {dup} appears twice")
    have = set(names)
    for s in samples:
        if s.name not in have:
            raise DataError(f"{s.source}: {s.name} has no row in {prob_path}")
    gold = np.array([gold_of[n] for n in names])
    return names, gold, p1, p2, fused, f"probabilities from `{prob_path}`, gold labels from `{test_list}`"


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("tools.report.report", __doc__)
    ap.add_argument("--output-dir", default="outputs")
    ap.add_argument("--probabilities", help="default: <output-dir>/probabilities.csv")
    ap.add_argument("--test-list", help="labelled test list (default: the one in <output-dir>/data/manifest.json)")
    args = ap.parse_args(argv)
    try:
        _, gold, p1, p2, fused, source = load_inputs(args.output_dir, args.probabilities, args.test_list)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    layout = Layout(args.output_dir)
    # the decisions the fusion started from (tools.decide.search), to tell their share from stage 2's
    decisions = (read_json(layout.fusion_params).get("decision_offsets") if layout.fusion_params.exists()
                 and not args.probabilities else None)
    report = write_report(args.output_dir, gold, p1, p2, fused, source, decisions)
    reduction = "n/a" if report.error_reduction_pct is None else f"{report.error_reduction_pct:.1f}%"
    print(f"weighted F1: stage 1 {report.stage1.weighted_f1:.3f}, fused {report.fused.weighted_f1:.3f} "
          f"({_signed(report.delta_weighted_f1)}); {HIGH_RISK} F1 {_signed(report.delta_high_f1)}; "
          f"errors {report.errors_stage1} -> {report.errors_fused} (reduction {reduction}); "
          f"stage-1 ECE {report.reliability.ece:.3f}")
    if report.decisions is not None:
        print(f"of which the decision offsets alone (no stage 2): weighted F1 {report.decisions.weighted_f1:.3f}, "
              f"{HIGH_RISK} F1 {report.decisions.f1[HIGH_RISK_INDEX]:.3f}; stage 2 and the search "
              f"{_signed(report.fused.weighted_f1 - report.decisions.weighted_f1)}")
    aucs = ", ".join(f"{k} {'–' if v is None else f'{v:.3f}'}" for k, v in report.auc.items())
    print(f"{HIGH_RISK}-vs-rest AUC: {aucs}; stage 2's {HIGH_RISK} F1 {report.stage2_high.f1:.3f} "
          f"(stage 1's {report.stage1_high.f1:.3f})")
    print(f"wrote {layout.report}, {layout.confusion_png}, {layout.reliability_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
