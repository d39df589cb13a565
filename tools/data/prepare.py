"""Step 1 of data-pre.sh: validate the official data, prepare every image once, split train/validation by label,
deal the folds.

    python -m tools.data.prepare --data-dir /data/ele --output-dir outputs --max-pixels 1003520

Reads the training and test lists (tools.data.lists) and writes, for every image they name, its prepared copy
(tools.data.images: upright, RGB, at exactly the size swift feeds the model at --max-pixels) under
<output-dir>/data/images/{train,test}/, with the list's names; unchanged images are not prepared again. A training
image that cannot be read stops the step (naming list, line and reason) unless --skip-bad-images 1, which leaves it
out and lists it; an unreadable test image never does: it is listed, warned about, and tools.decide.fuse gives it
the fallback label. Then writes, under <output-dir>/data/split/ (tools.task.Layout), each file atomically:
  train.txt      the training part of the split (<image>\t<label>): augmentation's input
  val.txt        the held-out part (every class at its natural share): checkpoint choice and fusion tuning
  test.txt       the test list, in its order (<image>, or <image>\t<label> when it has labels), every image
  folds/<i>.txt  with --folds k > 1: fold i's part of the training split (k stratified, seeded folds)
  split.json     inputs, the prepared image folders, unreadable images, seed, validation ratio, folds, counts
Nothing else: augmentation (tools.augment.run) and the stage sets (tools.compose.stage_sets) come after.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from tools import cli
from tools.data.images import prepare_image
from tools.data.lists import MAX_ERRORS_SHOWN, Sample, class_counts, count_table, read_list, write_list
from tools.data.split import check_folds, deal_folds, parse_folds, stratified_split
from tools.fileio import DataError, read_json, write_json, write_text
from tools.task import TEST_IMAGES, TEST_LIST, TRAIN_IMAGES, TRAIN_LIST, Layout


def _prepare_one(job: tuple[str, str, int]) -> tuple[str | None, str | None]:
    src, dst, max_pixels = job
    try:
        return prepare_image(src, dst, max_pixels), None
    except ValueError as e:
        return None, str(e)


def prepare_images(samples: list[Sample], folder: Path, max_pixels: int, workers: int | None = None,
                   desc: str = "preparing images") -> dict[str, str]:
    """Prepare every sample's image into folder/<name>; returns {name: reason} for those that cannot be read.
    An image whose source (size, time) and max_pixels match the folder's record is not prepared again."""
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / ".prepared.json"
    old = read_json(record_path) if record_path.exists() else {}
    record, jobs, keys = {}, [], {}
    for s in samples:
        try:
            st = os.stat(s.path)
            key = [st.st_size, st.st_mtime_ns, max_pixels]
        except OSError:
            key = None
        keys[s.name] = key
        if key is not None and old.get(s.name) == key and (folder / s.name).exists():
            record[s.name] = key
        else:
            jobs.append((str(s.path), str(folder / s.name), max_pixels))
    workers = workers or min(len(jobs) // 16 + 1, os.cpu_count() or 1)
    bad: dict[str, str] = {}
    bar = dict(total=len(jobs), desc=desc, leave=False, disable=not jobs)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(tqdm(pool.map(_prepare_one, jobs, chunksize=8), **bar))
    else:
        results = [_prepare_one(j) for j in tqdm(jobs, **bar)]
    for (src, dst, _), (status, error) in zip(jobs, results):
        name = Path(dst).name
        if error is None:
            record[name] = keys[name]
        else:
            bad[name] = error
            Path(dst).unlink(missing_ok=True)
    names = {s.name for s in samples}
    for stale in [p for p in folder.iterdir() if p.is_file() and p.name not in names and p != record_path]:
        stale.unlink()  # this step's own copies of images no longer listed
    write_text(record_path, json.dumps(record, ensure_ascii=False) + "\n")
    return bad


def _problems(samples: list[Sample], bad: dict[str, str]) -> list[str]:
    return [f"{s.source}: {bad[s.name]}: {s.path}" for s in samples if s.name in bad]


def prepare(args: argparse.Namespace) -> dict:
    data_dir = Path(args.data_dir)
    train_list = Path(args.train_list or data_dir / TRAIN_LIST)
    train_images = Path(args.train_images or data_dir / TRAIN_IMAGES)
    test_list = Path(args.test_list or data_dir / TEST_LIST)
    test_images = Path(args.test_images or data_dir / TEST_IMAGES)
    train = read_list(train_list, train_images, labelled=True, check_images=False)
    test = read_list(test_list, test_images, labelled=None, check_images=False)
    overlap = {s.name for s in train} & {s.name for s in test}
    if overlap and train_images.resolve() == test_images.resolve():
        raise DataError(f"{test_list}: {len(overlap)} test image(s) also in {train_list}, e.g. {sorted(overlap)[0]}")
    if not 0 < args.val_ratio < 1:
        raise DataError(f"VAL_RATIO (--val-ratio) must be between 0 and 1, both excluded, got {args.val_ratio}")
    fit, val = stratified_split(train, args.val_ratio, args.seed)
    check_folds(args.folds, fit)  # before anything is written

    layout = Layout(args.output_dir)
    bad_train = prepare_images(train, layout.prepared_images("train"), args.max_pixels, args.workers,
                               "preparing training images")
    if bad_train and not args.skip_bad_images:
        shown = _problems(train, bad_train)
        raise DataError(f"{len(shown)} training image(s) cannot be read ({train_list}):\n" + "\n".join(shown[:MAX_ERRORS_SHOWN])
                        + (f"\n... and {len(shown) - MAX_ERRORS_SHOWN} more" if len(shown) > MAX_ERRORS_SHOWN else "")
                        + "\nfix or remove them, or set SKIP_BAD_IMAGES=1 (--skip-bad-images 1) to leave them out")
    for line in _problems(train, bad_train):
        print(f"warning: left out (SKIP_BAD_IMAGES=1): {line}", file=sys.stderr)
    if bad_train:  # the split is made without them
        fit, val = stratified_split([s for s in train if s.name not in bad_train], args.val_ratio, args.seed)
        check_folds(args.folds, fit)
    bad_test = prepare_images(test, layout.prepared_images("test"), args.max_pixels, args.workers,
                              "preparing test images")
    for line in _problems(test, bad_test):
        print(f"warning: unreadable test image, it gets the fallback label: {line}", file=sys.stderr)
    folds = deal_folds(fit, args.folds, args.seed) if args.folds > 1 else []
    shutil.rmtree(layout.fold_list(0).parent, ignore_errors=True)  # this step's own fold lists of an earlier run
    write_list(layout.train_split, fit)
    write_list(layout.val_list, val)
    test_labelled = test[0].label is not None
    write_text(layout.test_list, "".join(f"{s.name}\t{s.label}\n" if test_labelled else f"{s.name}\n" for s in test))
    for i, held in enumerate(folds):
        write_list(layout.fold_list(i), held)
    record = {
        "train_list": str(train_list.resolve()), "test_list": str(test_list.resolve()),
        "source_train_images": str(train_images.resolve()), "source_test_images": str(test_images.resolve()),
        "train_images": str(layout.prepared_images("train")), "test_images": str(layout.prepared_images("test")),
        "max_pixels": args.max_pixels, "skipped_train_images": bad_train, "bad_test_images": bad_test,
        "test_labelled": test_labelled, "seed": args.seed, "val_ratio": args.val_ratio, "folds": args.folds,
        "counts": {"train": class_counts(fit), "val": class_counts(val), "test": class_counts(test),
                   "folds": [class_counts(held) for held in folds]},
    }
    write_json(layout.split_record, record)
    columns = {"train": fit, "val": val}
    if test_labelled:
        columns["test"] = test
    print(count_table(columns))
    print(f"test: {len(test)} images ({'labelled' if test_labelled else 'unlabelled'}"
          f"{f', {len(bad_test)} unreadable' if bad_test else ''})")
    if folds:
        print(f"{args.folds} folds of the training split for out-of-fold predictions: "
              f"{', '.join(str(len(h)) for h in folds)} images held out")
    print(f"wrote {layout.split_dir} and the prepared images in {layout.prepared_images('train').parent}")
    return record


def read_split(layout: Layout) -> tuple[dict, list[Sample], list[Sample], list[Sample], list[list[Sample]]]:
    """(split record, training part, validation part, test list, folds) as prepare() wrote them."""
    if not layout.split_record.exists():
        raise DataError(f"{layout.split_record}: not found: run tools.data.prepare (data-pre.sh) first")
    record = read_json(layout.split_record)
    images = record["train_images"]

    def labelled(path: Path) -> list[Sample]:
        if not path.read_text(encoding="utf-8").strip():
            return []
        return read_list(path, images, labelled=True, check_images=False, progress=False)

    fit, val = labelled(layout.train_split), labelled(layout.val_list)
    test = read_list(layout.test_list, record["test_images"], labelled=record["test_labelled"], check_images=False,
                     progress=False)
    folds = [labelled(layout.fold_list(i)) for i in range(record["folds"] if record["folds"] > 1 else 0)]
    return record, fit, val, test, folds


def without_fold(fit: list[Sample], held: list[Sample]) -> list[Sample]:
    """The training part without one fold's images: what that fold's runs train on (input order kept)."""
    held_names = {s.name for s in held}
    return [s for s in fit if s.name not in held_names]


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
    ap.add_argument("--max-pixels", type=int, default=1003520,
                    help="the model's image size, the recipe's MAX_PIXELS (default: %(default)s)")
    ap.add_argument("--skip-bad-images", type=int, choices=[0, 1], default=0,
                    help="1: leave unreadable training images out instead of stopping (SKIP_BAD_IMAGES)")
    ap.add_argument("--workers", type=int, default=None, help="processes preparing images (default: all cores)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(lambda: prepare(args))


if __name__ == "__main__":
    sys.exit(main())
