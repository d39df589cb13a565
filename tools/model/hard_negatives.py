"""Stage 2's hard negatives: the run's training images that are not 高风险 but that stage 1 rates most likely
高风险, each given one more row in the specialist's training set (train.sh, before stage 2, HARD_NEGATIVES > 0).

    python -m tools.model.hard_negatives --output-dir outputs --run final --ratio 1 [--task causal_lm] \
        [--batch-size 8] [-- extra swift infer flags]

Prints the training rows stage 2 is to use (tools.task.Layout.hard_negative_train_jsonl). Steps: the run's
training images (the split's training part; for fold i without fold i) that are not 高风险 are scored with the
same run's stage-1 checkpoint (tools.model.score's scoring: kept when the checkpoint, rows and arguments are
unchanged, continued when interrupted); the ratio x (the run's 高风险 image count) with the highest p(高风险) are
picked; the stage-2 set data-pre.sh composed is written again with one more row for each (an image already in it,
as every 中风险 image is, then counts twice). hard_negatives.json beside it records the settings and each picked
image with its label and p(高风险).

The same stage-1 checkpoint and ratio give the same file, so the run's fingerprint (tools.state.run_fingerprint:
the file's digest is part of it) is unchanged and RESUME=1 continues an interrupted stage 2. Stage 1 scores images
it trained on, so its confusions here are the ones it kept after training: the look-alikes it did not learn apart.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tools import cli
from tools.data.lists import Sample
from tools.data.prepare import read_split, without_fold
from tools.fileio import DataError, read_jsonl, write_json, write_jsonl
from tools.model.checkpoint import read_pointer
from tools.probs import aligned_probs
from tools.state import check_data, stage_target
from tools.task import FINAL, HIGH_RISK, HIGH_RISK_INDEX, TASKS, Layout, labelled_rows, sft_row

Scorer = Callable[[Path, Path, Path], None]  # (checkpoint, rows to score, probability CSV to write)


def run_pool(layout: Layout, run: str | int) -> list[Sample]:
    """The labelled images the run trains on: the split's training part, without fold i's images for fold i."""
    _, fit, _, _, folds = read_split(layout)
    if str(run) == FINAL:
        return fit
    if not 0 <= int(run) < len(folds):
        raise DataError(f"run {run}: no such fold (data-pre.sh made {len(folds)} folds)")
    return without_fold(fit, folds[int(run)])


def hard_count(pool: Sequence[Sample], ratio: float) -> int:
    """ratio x the pool's 高风险 images, rounded, at most the pool's other images."""
    high = sum(s.label == HIGH_RISK for s in pool)
    return min(len(pool) - high, round(ratio * high))


def pick(p_high: np.ndarray, n: int) -> list[int]:
    """Indices of the n highest p(高风险), highest first; equal values keep their input order."""
    return [int(i) for i in np.argsort(-np.asarray(p_high, dtype=np.float64), kind="stable")[:max(0, n)]]


def default_scorer(swift_argv: list[str], batch_size: int) -> Scorer:
    """Scores as test.sh does (tools.model.shards: one process per GPU when several are visible)."""
    def score(checkpoint: Path, dataset: Path, output: Path) -> None:
        from tools.model.shards import score_jobs_on_gpus

        score_jobs_on_gpus([(checkpoint, [(dataset, output)])], swift_argv, batch_size)
    return score


def mine(layout: Layout, run: str | int, ratio: float, task: str = "causal_lm", scorer: Scorer | None = None) -> Path:
    """Write the run's stage-2 rows with hard negatives (and hard_negatives.json); returns the rows' path."""
    if ratio <= 0:
        raise DataError(f"HARD_NEGATIVES={ratio}: give a number > 0 (0 turns hard negatives off in train.sh)")
    manifest = check_data(layout)
    pool = run_pool(layout, run)
    try:
        checkpoint = read_pointer(layout.run_dir("stage1", run))
    except FileNotFoundError as e:
        raise DataError(f"hard negatives for stage 2 are mined with the same run's stage 1, which has no model yet "
                        f"({e}); train stage 1 first, or set HARD_NEGATIVES=0") from None
    candidates = [s for s in pool if s.label != HIGH_RISK]
    n = hard_count(pool, ratio)
    rows_path, probs_path = layout.hard_negative_candidates(run), layout.hard_negative_probs(run)
    rows = [sft_row(s.path, None) for s in candidates]
    if not rows_path.exists() or read_jsonl(rows_path) != rows:  # unchanged rows keep the scored CSV (its record)
        write_jsonl(rows_path, rows)
    p_high = np.zeros(0)
    if candidates and n:
        (scorer or default_scorer([], 8))(checkpoint, rows_path, probs_path)
        p_high = aligned_probs(probs_path, [s.path.name for s in candidates], f"{rows_path}")[:, HIGH_RISK_INDEX]
    chosen = pick(p_high, n)
    picked = [candidates[i] for i in chosen]
    base = layout.train_jsonl("stage2", run, task)
    out = layout.hard_negative_train_jsonl(run, task)
    write_jsonl(out, read_jsonl(base) + labelled_rows(picked, stage_target(manifest, "stage2"), task))
    write_json(layout.hard_negative_record(run), {
        "ratio": ratio, "count": len(picked), "stage1_checkpoint": str(checkpoint.relative_to(layout.root)),
        "candidates": len(candidates), "base_rows": str(base.relative_to(layout.root)), "task": task,
        "picked_labels": dict(Counter(s.label for s in picked)),
        "picked": [{"image": s.name, "label": s.label, "p_high": round(float(p_high[i]), 6)}
                   for s, i in zip(picked, chosen)]})
    labels = ", ".join(f"{k} {v}" for k, v in Counter(s.label for s in picked).most_common())
    print(f"hard negatives ({run}): {len(picked)} of {len(candidates)} non-{HIGH_RISK} training images stage 1 rates "
          f"most {HIGH_RISK}" + (f" ({labels}; p from {p_high[chosen[-1]]:.3f} to {p_high[chosen[0]]:.3f})"
                                 if picked else "") + f" -> {out}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, swift_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = cli.parser("tools.model.hard_negatives", __doc__)
    ap.add_argument("--output-dir", default="outputs", help="pipeline output folder (default: %(default)s)")
    ap.add_argument("--run", default=FINAL, help="final (default) or a fold number")
    ap.add_argument("--ratio", type=float, required=True,
                    help="hard negatives as a multiple of the run's 高风险 images (HARD_NEGATIVES)")
    ap.add_argument("--task", choices=list(TASKS), default="causal_lm", help="stage 2's --task_type (its rows' form)")
    ap.add_argument("--batch-size", type=int, default=8, help="scoring batch size (SCORE_BATCH_SIZE)")
    args = ap.parse_args(ours)

    def step() -> None:
        layout = Layout(args.output_dir)
        print(mine(layout, args.run, args.ratio, args.task, default_scorer(swift_argv, args.batch_size)))

    from tools.model.speedups import SpeedupError

    return cli.run(step, errors=(DataError, SpeedupError))


if __name__ == "__main__":
    sys.exit(main())
