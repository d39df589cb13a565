"""Augmentation off vs on: the test scores of finished pipeline runs side by side, as a Markdown table.

    python -m tools.report.ablation off=outputs/ablation/augment0 on=outputs/ablation/augment1

Each run is an OUTPUT_DIR after data-pre.sh, train.sh and scoring (bench/augment_ablation.sh makes both). The
gold labels come from the run's labelled test list (data/split/test.txt); stage 1 is read from
stage1/test_probs.csv (tools.model.score, also what test.sh writes), the fused result from probabilities.csv when
test.sh ran both stages. Scores are tools.report.metrics': weighted F1 = Σ w·F1 (max 6.5) and 高风险's F1.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tools import cli
from tools.data.lists import read_list
from tools.fileio import DataError, read_json
from tools.probs import aligned_probs, read_probabilities
from tools.report.metrics import Evaluation, evaluate
from tools.task import HIGH_RISK, HIGH_RISK_INDEX, LABEL_TO_INDEX, MAX_SCORE, Layout

TIMING = "ablation.json"  # written into each run folder by bench/augment_ablation.sh: {"seconds": train + test}


def fused_probs(path: Path, names: list[str]) -> np.ndarray:
    """The fused columns of tools.decide.fuse's probabilities.csv, which must list exactly `names`, in order."""
    got, _, _, fused = read_probabilities(path)
    if got != names:
        raise DataError(f"{path}: does not match the test list")
    return fused


def run_scores(output_dir: str | Path) -> dict:
    """{'stage1': Evaluation, 'fused': Evaluation or None, 'stage1_rows': int, 'copies': int,
    'augment_seconds': the augmentation step's, 'seconds': train + test (None when not recorded)}."""
    layout = Layout(output_dir)
    manifest = read_json(layout.manifest)
    test = read_list(layout.test_list, manifest["test_images"], labelled=True, check_images=False, progress=False)
    names = [s.name for s in test]
    gold = [LABEL_TO_INDEX[s.label] for s in test]
    p1 = aligned_probs(layout.probs("stage1", "test"), names)
    aug = manifest.get("augmentation") or {}
    out: dict = {"stage1": evaluate(gold, p1.argmax(1)), "fused": None,
                 "stage1_rows": sum(manifest["counts"]["stage1_rows"].values()),
                 "copies": sum(aug.get("counts", {}).get("kept", {}).values()),
                 "augment_seconds": aug.get("seconds"), "seconds": None}
    if layout.probabilities.exists() and layout.probs("stage2", "test").exists():
        out["fused"] = evaluate(gold, fused_probs(layout.probabilities, names).argmax(1))
    timing = layout.root / TIMING
    if timing.exists():
        out["seconds"] = json.loads(timing.read_text(encoding="utf-8")).get("seconds")
    return out


def table(runs: dict[str, dict]) -> str:
    def f(s: Evaluation | None, high: bool = False) -> str:
        if s is None:
            return "–"
        return f"{s.f1[HIGH_RISK_INDEX]:.3f}" if high else f"{s.weighted_f1:.3f}"

    def secs(v) -> str:
        return "–" if v is None else f"{v:.0f}"

    lines = [f"| run | augmented copies | stage-1 rows | stage-1 weighted F1 (max {MAX_SCORE:g}) | stage-1 {HIGH_RISK} F1 "
             f"| fused weighted F1 | fused {HIGH_RISK} F1 | augment step s | train + test s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['copies']} | {r['stage1_rows']} | {f(r['stage1'])} | {f(r['stage1'], True)} "
                     f"| {f(r['fused'])} | {f(r['fused'], True)} | {secs(r['augment_seconds'])} | {secs(r['seconds'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("tools.report.ablation", __doc__)
    ap.add_argument("runs", nargs="+", metavar="NAME=OUTPUT_DIR", help="a finished run, named for the table")
    args = ap.parse_args(argv)
    runs = {}
    try:
        for item in args.runs:
            name, sep, folder = item.partition("=")
            if not sep:
                ap.error(f"expected NAME=OUTPUT_DIR, got {item!r}")
            runs[name] = run_scores(folder)
    except (DataError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
