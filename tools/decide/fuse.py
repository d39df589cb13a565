"""Fuse both stages' test probabilities and write the submission.

    python -m tools.decide.fuse --output-dir outputs [--fusion-params outputs/fusion.json]

Reads <output-dir>/stage1/test_probs.csv and stage2/test_probs.csv (tools.model.score), checks that both cover
the test list's readable images exactly, in order, fuses them (tools.decide.fusion), and writes atomically:
  b-submit.txt       image<TAB>label, the test list's order, no header
  probabilities.csv  per image: stage 1's vector, stage 2's p(高风险), the fused vector and the label
A test image data-pre.sh could not read (manifest.json's bad_test_images) is never lost: it gets the fallback,
the training split's class shares as probabilities and so its most common label, with a warning naming it.
When the test list carries labels, prints the weighted F1, per-class P/R/F1 and the confusion matrix for
stage 1 alone and fused.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tools import cli
from tools.data.lists import read_list
from tools.decide.fusion import FusionParams, fuse
from tools.decide.submission import write_submission
from tools.fileio import DataError, read_json
from tools.probs import aligned_probs, write_probabilities
from tools.report.metrics import evaluate
from tools.task import HIGH_RISK_INDEX, LABEL_TO_INDEX, LABELS, Layout


def fallback_probs(manifest: dict) -> np.ndarray:
    """The probabilities an unreadable test image gets: the training split's class shares (so its label is the
    most common training label: 无风险 on the official data)."""
    counts = np.array([manifest["counts"]["train"][label] for label in LABELS], dtype=np.float64)
    return counts / counts.sum() if counts.sum() else np.full(len(LABELS), 1 / len(LABELS))


def fuse_test(output_dir: str | Path, fusion_params: str | Path | None = None, quiet: bool = False) -> dict:
    layout = Layout(output_dir)
    if not layout.manifest.exists():
        raise DataError(f"{layout.manifest}: not found: run data-pre.sh first")
    manifest = read_json(layout.manifest)
    test = read_list(layout.test_list, manifest["test_images"], labelled=None, check_images=False, progress=False)
    names = [s.name for s in test]
    bad = manifest.get("bad_test_images", {})
    scored = [name for name in names if name not in bad]
    params_path = Path(fusion_params) if fusion_params else layout.fusion_params
    params = FusionParams.load(params_path) if params_path.exists() else FusionParams()
    prior = fallback_probs(manifest)
    p1, fused = (np.tile(prior, (len(names), 1)) for _ in range(2))
    p2_high = np.full(len(names), prior[HIGH_RISK_INDEX])
    rows = [i for i, name in enumerate(names) if name not in bad]
    p1[rows] = aligned_probs(layout.probs("stage1", "test"), scored, "the readable test images")
    p2_high[rows] = aligned_probs(layout.probs("stage2", "test"), scored, "the readable test images")[:, HIGH_RISK_INDEX]
    fused[rows] = fuse(p1[rows], p2_high[rows], params)
    labels = [LABELS[i] for i in fused.argmax(1)]  # an unreadable image: the training split's most common label
    for name, reason in bad.items():
        print(f"warning: {name}: unreadable ({reason}): fallback label {LABELS[int(prior.argmax())]}", file=sys.stderr)
    write_submission(layout.submission, names, labels)
    write_probabilities(layout.probabilities, names, p1, p2_high, fused, labels)
    result = {"submission": str(layout.submission), "n": len(names), "fusion": params}
    if not quiet:
        print(f"fusion: beta {params.beta:g}, offsets {params.offsets}"
              f" ({'from ' + str(params_path) if params_path.exists() else 'default'})")
    if test and test[0].label is not None:
        gold = [LABEL_TO_INDEX[s.label] for s in test]
        result["stage1"] = evaluate(gold, p1.argmax(1))
        result["fused"] = evaluate(gold, fused.argmax(1))
        if not quiet:
            print("\n== stage 1 alone ==\n" + result["stage1"].table())
            print("\n== fused (stage 1 × stage-2 high-risk correction) ==\n" + result["fused"].table())
    if not quiet:
        print(f"\nwrote {layout.submission} ({len(names)} images) and {layout.probabilities}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("tools.decide.fuse", __doc__)
    ap.add_argument("--output-dir", default="outputs")
    ap.add_argument("--fusion-params", help="fusion JSON (default: <output-dir>/fusion.json if present, else beta 1)")
    args = ap.parse_args(argv)
    return cli.run(lambda: fuse_test(args.output_dir, args.fusion_params), errors=(DataError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
