"""Score images with trained stages: one probability CSV per dataset, a probability vector per row over the model's
own labels (the five, or 高风险/非高风险 for a binary specialist), prior-corrected when its run recorded its shares.

    python -m tools.model.score --output-dir outputs [--runs final folds] [-- extra swift infer flags]
    python -m tools.model.score --checkpoint outputs/stage1/checkpoint-N --dataset outputs/data/test.jsonl \
        --output outputs/stage1/test_probs.csv [-- extra swift infer flags]

With --output-dir it scores what test.sh needs, each checkpoint loaded once (the final models on the test set
and the validation split; with --runs folds each fold's models on the fold they did not train on) and writes the
CSVs where tools.task.Layout puts them. One GPU or none: in this process (tools.model.infer); several visible:
one process per GPU (tools.model.shards, SCORE_GPUS). Resumable: a CSV scored with the same checkpoint, rows and
arguments is kept, and an interrupted run continues from the rows it wrote.

Arguments after -- go to swift's InferArguments (e.g. --max_pixels). How the probabilities are computed, and the
speed knobs (--workers, --no-bucket, $SCORE_AUTOCAST): tools/model/infer.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

from tools import cli
from tools.fileio import DataError, read_json
from tools.model.checkpoint import read_pointer
from tools.model.shards import score_jobs_on_gpus
from tools.task import FINAL, STAGES, Layout


def jobs_for(layout: Layout, runs: list[str], folds: int) -> list[tuple[Path, list[tuple[Path, Path]]]]:
    """(checkpoint, [(rows to score, CSV to write), ...]) for each run and stage: the final models score the test
    set and the validation split, fold i's models their held-out fold."""
    jobs = []
    for run in runs:
        run_ids = [FINAL] if run == FINAL else list(range(folds if folds > 1 else 0))
        for run_id in run_ids:
            for stage in STAGES:
                if run_id == FINAL:
                    parts = [(layout.test_jsonl, layout.probs(stage, "test")),
                             (layout.val_jsonl(stage), layout.probs(stage, "val"))]
                else:
                    parts = [(layout.heldout_jsonl(run_id), layout.probs(stage, "heldout", run_id))]
                jobs.append((read_pointer(layout.run_dir(stage, run_id)), parts))
    return jobs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, swift_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = cli.parser("tools.model.score", __doc__)
    ap.add_argument("--output-dir", help="pipeline output folder: score what test.sh needs (see --runs)")
    ap.add_argument("--runs", nargs="+", choices=[FINAL, "folds"], default=[FINAL],
                    help="with --output-dir: final = both stages' final models on the test set and the validation "
                         "split; folds = each fold's models on their held-out fold (default: final)")
    ap.add_argument("--checkpoint", help="or: one swift training checkpoint (adapter) directory ...")
    ap.add_argument("--dataset", action="append", default=[], help="... swift JSONL rows to score (repeatable) ...")
    ap.add_argument("--output", action="append", default=[],
                    help="... CSV: image, then one probability column per label (one per --dataset)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None,
                    help="processes encoding images ahead of the GPU (default: $SCORE_WORKERS, else up to 8 on "
                         "CUDA, 0 on CPU)")
    ap.add_argument("--no-bucket", dest="bucket", action="store_false",
                    help="batch rows in file order instead of grouping equal image sizes")
    args = ap.parse_args(ours)
    if args.output_dir and (args.checkpoint or args.dataset):
        ap.error("give either --output-dir or --checkpoint/--dataset/--output")
    if not args.output_dir and (not args.checkpoint or not args.dataset or len(args.dataset) != len(args.output)):
        ap.error("give --checkpoint and one --output per --dataset (or --output-dir)")

    def step() -> None:
        if args.output_dir:
            layout = Layout(args.output_dir)
            if not layout.manifest.exists():
                raise DataError(f"{layout.manifest}: not found: run data-pre.sh first")
            jobs = jobs_for(layout, args.runs, int(read_json(layout.manifest).get("folds", 1)))
        else:
            jobs = [(Path(args.checkpoint), list(zip(map(Path, args.dataset), map(Path, args.output))))]
        with out_of_memory_hint(args.batch_size):
            score_jobs_on_gpus(jobs, swift_argv, args.batch_size, args.workers, args.bucket)

    from tools.model.infer import ScoringOutOfMemory, out_of_memory_hint
    from tools.model.speedups import SpeedupError

    return cli.run(step, errors=(DataError, FileNotFoundError, SpeedupError, ScoringOutOfMemory))


if __name__ == "__main__":
    sys.exit(main())
