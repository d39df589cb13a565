"""Step 1 of data-pre.sh: validate the official data, split train/validation by label, deal the folds.

    python -m tools.data.prepare --data-dir /data/ele --output-dir outputs

Reads the training and test lists and checks every image they name (tools.data.lists). Writes, under
<output-dir>/data/split/ (tools.task.Layout), each file atomically:
  train.txt      the training part of the split (<image>\t<label>): augmentation's input
  val.txt        the held-out part (every class at its natural share): checkpoint choice and fusion tuning
  test.txt       the checked test list, in its order (<image>, or <image>\t<label> when it has labels)
  folds/<i>.txt  with --folds k > 1: fold i's part of the training split (k stratified, seeded folds)
  split.json     inputs, seed, validation ratio, folds and counts
Nothing else: augmentation (tools.augment.run) and the stage sets (tools.compose.stage_sets) come after.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from tools import cli
from tools.data.lists import class_counts, count_table, read_list, write_list
from tools.data.split import check_folds, deal_folds, parse_folds, stratified_split
from tools.fileio import DataError, write_json, write_text
from tools.task import TEST_IMAGES, TEST_LIST, TRAIN_IMAGES, TRAIN_LIST, Layout


def prepare(args: argparse.Namespace) -> dict:
    data_dir = Path(args.data_dir)
    train_list = Path(args.train_list or data_dir / TRAIN_LIST)
    train_images = Path(args.train_images or data_dir / TRAIN_IMAGES)
    test_list = Path(args.test_list or data_dir / TEST_LIST)
    test_images = Path(args.test_images or data_dir / TEST_IMAGES)
    train = read_list(train_list, train_images, labelled=True, workers=args.workers)
    test = read_list(test_list, test_images, labelled=None, workers=args.workers)
    overlap = {s.name for s in train} & {s.name for s in test}
    if overlap and train_images.resolve() == test_images.resolve():
        raise DataError(f"{test_list}: {len(overlap)} test image(s) also in {train_list}, e.g. {sorted(overlap)[0]}")

    fit, val = stratified_split(train, args.val_ratio, args.seed)
    check_folds(args.folds, fit)  # before anything is written
    folds = deal_folds(fit, args.folds, args.seed) if args.folds > 1 else []
    layout = Layout(args.output_dir)
    shutil.rmtree(layout.fold_list(0).parent, ignore_errors=True)  # this step's own fold lists of an earlier run
    write_list(layout.train_split, fit)
    write_list(layout.val_list, val)
    test_labelled = test[0].label is not None
    write_text(layout.test_list, "".join(f"{s.name}\t{s.label}\n" if test_labelled else f"{s.name}\n" for s in test))
    for i, held in enumerate(folds):
        write_list(layout.fold_list(i), held)
    record = {
        "train_list": str(train_list.resolve()), "train_images": str(train_images.resolve()),
        "test_list": str(test_list.resolve()), "test_images": str(test_images.resolve()),
        "test_labelled": test_labelled, "seed": args.seed, "val_ratio": args.val_ratio, "folds": args.folds,
        "counts": {"train": class_counts(fit), "val": class_counts(val), "test": class_counts(test),
                   "folds": [class_counts(held) for held in folds]},
    }
    write_json(layout.split_record, record)
    columns = {"train": fit, "val": val}
    if test_labelled:
        columns["test"] = test
    print(count_table(columns))
    print(f"test: {len(test)} images ({'labelled' if test_labelled else 'unlabelled'})")
    if folds:
        print(f"{args.folds} folds of the training split for out-of-fold predictions: "
              f"{', '.join(str(len(h)) for h in folds)} images held out")
    print(f"wrote {layout.split_dir}")
    return record


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser("tools.data.prepare", __doc__)
    ap.add_argument("--data-dir", required=True, help="competition data folder (official layout)")
    ap.add_argument("--output-dir", default="outputs", help="pipeline output folder (default: %(default)s)")
    ap.add_argument("--train-list", help=f"default: <data-dir>/{TRAIN_LIST}")
    ap.add_argument("--train-images", help=f"default: <data-dir>/{TRAIN_IMAGES}/")
    ap.add_argument("--test-list", help=f"default: <data-dir>/{TEST_LIST}")
    ap.add_argument("--test-images", help=f"default: <data-dir>/{TEST_IMAGES}/")
    ap.add_argument("--val-ratio", type=float, default=0.1, help="validation share per label (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--folds", type=parse_folds, default=1,
                    help="k > 1: also deal the training split into k stratified folds, for out-of-fold predictions "
                         "(FOLDS; default: %(default)s = no folds)")
    ap.add_argument("--workers", type=int, default=None, help="processes for image checks (default: all cores)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(lambda: prepare(args))


if __name__ == "__main__":
    sys.exit(main())
