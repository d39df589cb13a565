"""Fuse both stages' test probabilities and write the submission.

    python -m tools.predict --output-dir outputs [--fusion-params outputs/fusion.json]

Reads <output-dir>/stage1/test_probs.csv and stage2/test_probs.csv (tools.score), checks that both cover the
test list exactly, in order, fuses them (tools.fusion), and writes atomically:
  b-submit.txt       image<TAB>label, the test list's order, no header
  probabilities.csv  per image: both stages' vectors, the fused vector and the label
When the test list carries labels, prints the weighted F1, per-class P/R/F1 and the confusion matrix for
stage 1 alone and fused.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from tools.dataset import DataError, read_list
from tools.fileio import atomic_open
from tools.fusion import FusionParams, fuse
from tools.metrics import score
from tools.score import read_probs
from tools.submission import write_submission
from tools.task import HIGH_RISK_INDEX, LABEL_TO_INDEX, LABELS, Layout, read_json


def aligned_probs(path: Path, names: list[str]) -> np.ndarray:
    """The probability rows of `path`, which must name exactly `names`, in that order."""
    got, probs = read_probs(path)
    if got != names:
        missing = sorted(set(names) - set(got))
        extra = sorted(set(got) - set(names))
        detail = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else "different order")
        raise DataError(f"{path}: does not match the test list ({len(got)} rows vs {len(names)}; {detail})")
    return probs


def write_probabilities(path: Path, names: list[str], p1: np.ndarray, p2: np.ndarray, fused: np.ndarray,
                        labels: list[str]) -> None:
    with atomic_open(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image", *(f"stage1_{x}" for x in LABELS), *(f"stage2_{x}" for x in LABELS),
                    *(f"fused_{x}" for x in LABELS), "label"])
        for i, name in enumerate(names):
            w.writerow([name, *(f"{v:.6f}" for v in (*p1[i], *p2[i], *fused[i])), labels[i]])


def predict(output_dir: str | Path, fusion_params: str | Path | None = None, quiet: bool = False) -> dict:
    layout = Layout(output_dir)
    manifest = read_json(layout.manifest)
    test = read_list(manifest["test_list"], manifest["test_images"], labelled=None, check_images=False)
    names = [s.name for s in test]
    p1 = aligned_probs(layout.run_dir("stage1") / "test_probs.csv", names)
    p2 = aligned_probs(layout.run_dir("stage2") / "test_probs.csv", names)
    params_path = Path(fusion_params) if fusion_params else layout.fusion_params
    params = FusionParams.load(params_path) if params_path.exists() else FusionParams()
    fused = fuse(p1, p2[:, HIGH_RISK_INDEX], params)
    labels = [LABELS[i] for i in fused.argmax(1)]
    write_submission(layout.submission, names, labels)
    write_probabilities(layout.probabilities, names, p1, p2, fused, labels)
    result = {"submission": str(layout.submission), "n": len(names), "fusion": params}
    if not quiet:
        print(f"fusion: beta {params.beta:g}, offsets {params.offsets}"
              f" ({'from ' + str(params_path) if params_path.exists() else 'default'})")
    if test and test[0].label is not None:
        gold = [LABEL_TO_INDEX[s.label] for s in test]
        result["stage1"] = score(gold, p1.argmax(1))
        result["fused"] = score(gold, fused.argmax(1))
        if not quiet:
            print("\n== stage 1 alone ==\n" + result["stage1"].table())
            print("\n== fused (stage 1 × stage-2 high-risk correction) ==\n" + result["fused"].table())
    if not quiet:
        print(f"\nwrote {layout.submission} ({len(names)} images) and {layout.probabilities}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.predict", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default="outputs")
    ap.add_argument("--fusion-params", help="fusion JSON (default: <output-dir>/fusion.json if present, else beta 1)")
    args = ap.parse_args(argv)
    try:
        predict(args.output_dir, args.fusion_params)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
