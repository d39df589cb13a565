"""Validate the official data, split train/validation by label, and write swift JSONL for both stages.

    python -m tools.prepare_data --data-dir /data/ele --output-dir outputs

Writes, under <output-dir>/data/:
  stage1_train.jsonl  all five labels; rare classes repeated up to --stage1-min-share of the rows
  stage1_val.jsonl    the held-out split (every class, natural shares)
  stage2_train.jsonl  the high-risk specialist's set: every 高风险 (repeated --stage2-high-repeat times),
                      every 中风险 (the look-alike: clutter vs e-bikes), and a sample of the other classes
                      (--stage2-other-ratio times the number of 高风险 images)
  stage2_val.jsonl    same held-out split as stage 1, so both stages are judged on the same images
  test.jsonl          inference rows, in the test list's order
  train_split.txt     the training part of the split (<image>\t<label>), the only input of augmentation
  val.txt             the held-out part, for tuning fusion
  manifest.json       inputs, seed, composition settings and counts, read by train.sh, test.sh and
                      tools.augment_data

With --folds k > 1 (FOLDS in data-pre.sh) the training part is also dealt into k stratified, seeded folds for
out-of-fold predictions (train.sh trains one model pair per fold, test.sh tunes fusion on their predictions of
the images they did not see). Under <output-dir>/data/folds/<i>/:
  stage1_train.jsonl  the other k-1 folds, composed as stage1_train.jsonl above
  stage2_train.jsonl  the other k-1 folds, composed as stage2_train.jsonl above
  heldout.jsonl       fold i's images (labelled rows, scored by test.sh with fold i's models)
  heldout.txt         the same images as <image>\t<label>
With k = 1 (the default) nothing of this is written.

Augmentation (tools.augment_data, run by data-pre.sh after this) rewrites the two training JSONLs with
stage1_set/stage2_set below, given its augmented copies: they take the place of plain repeats.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from tools.dataset import DataError, Sample, class_counts, read_list, write_list
from tools.fileio import write_json, write_jsonl, write_text
from tools.fusion_search import stratified_folds as deal_folds
from tools.task import HIGH_RISK, LABELS, TEST_IMAGES, TEST_LIST, TRAIN_IMAGES, TRAIN_LIST, Layout, sft_row

TRAIN_SPLIT = "train_split.txt"  # in <output-dir>/data/: the training part of the split
AUGMENTED = "augmented"  # in <output-dir>/data/: tools.augment_data's images, lists and report


def train_split_list(layout: Layout) -> Path:
    return layout.data_dir / TRAIN_SPLIT


def augmented_dir(layout: Layout) -> Path:
    return layout.data_dir / AUGMENTED


def stratified_split(samples: list[Sample], val_ratio: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Per label, a seeded shuffle puts round(n * val_ratio) images in validation (at least one when the
    label has two or more images and val_ratio > 0). Both parts keep the input order."""
    if not 0 <= val_ratio < 1:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    rng = np.random.default_rng(seed)
    val_names: set[str] = set()
    for label in LABELS:
        names = [s.name for s in samples if s.label == label]
        n_val = round(len(names) * val_ratio)
        if val_ratio > 0 and len(names) >= 2:
            n_val = min(max(n_val, 1), len(names) - 1)
        val_names.update(rng.permutation(names)[:n_val].tolist())
    return [s for s in samples if s.name not in val_names], [s for s in samples if s.name in val_names]


def oversample(samples: list[Sample], min_share: float, seed: int) -> list[Sample]:
    """Repeat each rare label's images (whole copies, then a seeded sample) until it makes up at least
    `min_share` of the rows. The result is shuffled with the seed."""
    rng = np.random.default_rng(seed)
    by_label = {label: [s for s in samples if s.label == label] for label in LABELS if any(s.label == label for s in samples)}
    # Final size T: the common labels keep their count and each rare one becomes min_share·T, so
    # T = common / (1 - #rare·min_share). A label that falls under the share as T grows becomes rare too.
    rare: set[str] = set()
    while True:
        common = sum(len(v) for k, v in by_label.items() if k not in rare)
        total = common / (1 - len(rare) * min_share) if len(rare) * min_share < 1 else float("inf")
        grown = {k for k, v in by_label.items() if k not in rare and len(v) < min_share * total}
        if not grown or total == float("inf"):
            break
        rare |= grown
    rows: list[Sample] = []
    for label, items in by_label.items():
        target = int(np.ceil(min_share * total)) if label in rare and total != float("inf") else len(items)
        reps, extra = divmod(max(target, len(items)), len(items))
        rows += items * reps + [items[i] for i in rng.permutation(len(items))[:extra]]
    return [rows[i] for i in rng.permutation(len(rows))]


def stage1_set(samples: list[Sample], min_share: float, seed: int, augmented: Sequence[Sample] = ()) -> list[Sample]:
    """Stage 1's training rows: the originals and every augmented copy, then plain repeats (oversample) only
    for a label still under `min_share` of the rows. Without copies this is oversample(samples) exactly."""
    return oversample(list(samples) + list(augmented), min_share, seed)


def stage2_set(samples: list[Sample], high_repeat: int, other_ratio: float, seed: int,
               augmented: Sequence[Sample] = ()) -> list[Sample]:
    """The specialist's training rows: 高风险 ×high_repeat, all 中风险, and other_ratio × #高风险 of the rest.

    Sizes are set by the original images. With augmented copies, the 高风险 block is the originals plus a
    seeded sample of the 高风险 copies (insertion-made ones included) in place of the plain repeats; a
    repeat is used only when there are too few copies. Without copies the rows are exactly as before."""
    rng = np.random.default_rng(seed)
    high = [s for s in samples if s.label == HIGH_RISK]
    medium = [s for s in samples if s.label == "中风险"]
    rest = [s for s in samples if s.label not in (HIGH_RISK, "中风险")]
    n_rest = min(len(rest), round(other_ratio * len(high)))
    picked = [rest[i] for i in sorted(rng.permutation(len(rest))[:n_rest])]
    copies = [a for a in augmented if a.label == HIGH_RISK]
    if copies and high and high_repeat >= 1:
        aug_rng = np.random.default_rng([seed, 2])  # its own stream: the rows above are as without copies
        n_copies = min(len(copies), (high_repeat - 1) * len(high))
        high_rows = high + [copies[i] for i in sorted(aug_rng.permutation(len(copies))[:n_copies])]
        reps, extra = divmod(high_repeat * len(high) - len(high_rows), len(high))
        high_rows += high * reps + [high[i] for i in sorted(aug_rng.permutation(len(high))[:extra])]
    else:
        high_rows = high * high_repeat
    rows = high_rows + medium + picked
    return [rows[i] for i in rng.permutation(len(rows))]


# Stage-set composition (the --stage1-min-share, --stage2-high-repeat, --stage2-other-ratio defaults); the
# manifest records the values used, and tools.augment_data falls back to these for an older manifest.
DEFAULT_COMPOSITION = {"stage1_min_share": 0.1, "stage2_high_repeat": 3, "stage2_other_ratio": 2.0}


def write_sft_rows(path: Path, samples: Sequence[Sample]) -> None:
    """swift JSONL, one labelled row per sample (written atomically)."""
    write_jsonl(path, (sft_row(s.path, s.label) for s in samples))


def stage_sets(samples: list[Sample], composition: dict, seed: int, augmented: Sequence[Sample] = ()
               ) -> tuple[list[Sample], list[Sample]]:
    """(stage-1 rows, stage-2 rows) with the manifest's composition settings."""
    return (stage1_set(samples, composition["stage1_min_share"], seed, augmented),
            stage2_set(samples, composition["stage2_high_repeat"], composition["stage2_other_ratio"], seed,
                       augmented))


def parse_folds(text: str) -> int:
    """--folds / FOLDS: a whole number >= 1."""
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1 or str(k) != text.strip():
        raise argparse.ArgumentTypeError(f"FOLDS (--folds) must be a whole number >= 1 (1 = no folds), got {text!r}")
    return k


def check_folds(k: int, fit: list[Sample]) -> None:
    """k folds need at least k images of every label in the training split: then every fold holds out, and
    trains on, at least one image of each label (a fold without 高风险 to train on is no model of the task)."""
    if k < 1:
        raise DataError(f"FOLDS (--folds) must be at least 1 (1 = no folds), got {k}")
    if k == 1:
        return
    counts = {label: n for label, n in class_counts(fit).items() if n > 0}
    if not counts:
        raise DataError(f"FOLDS={k} (--folds): the training split is empty")
    label, n = min(counts.items(), key=lambda kv: kv[1])
    if n < k:
        raise DataError(f"FOLDS={k} (--folds): the training split ({TRAIN_SPLIT}) has only {n} {label} image(s); "
                        f"every fold must hold out and train on each label, so FOLDS can be at most {n}")


def stratified_folds(fit: list[Sample], k: int, seed: int) -> list[list[Sample]]:
    """The held-out part of each of k folds: every image in exactly one, each label dealt round-robin after a
    seeded shuffle (per-label and total fold sizes differ by at most one). Each part keeps the input order.
    Its own random stream: the split and the stage sets are the same with or without folds."""
    gold = np.array([s.label_index for s in fit], dtype=int)
    fold = deal_folds(gold, k, np.random.default_rng([seed, 4]))
    return [[s for s, f in zip(fit, fold) if f == i] for i in range(k)]


def read_folds(layout: Layout, k: int, train_images: str | Path) -> list[list[Sample]]:
    """The held-out parts that prepare() wrote (tools.augment_data rebuilds the fold sets from them)."""
    heldout = []
    for i in range(k):
        path = layout.fold_heldout_list(i)
        if not path.exists():
            raise DataError(f"{path}: not found, but manifest.json says {k} folds: run tools.prepare_data "
                            "(data-pre.sh) again")
        heldout.append(read_list(path, train_images, labelled=True, check_images=False, progress=False))
    return heldout


def write_folds(layout: Layout, fit: list[Sample], heldout: list[list[Sample]], composition: dict, seed: int,
                augmented: Sequence[Sample] = (), sources: dict[str, str] | None = None) -> list[dict]:
    """Fold i's training sets: the stage sets of the images outside fold i, plus the augmented copies whose
    source image is outside fold i (sources: copy name -> source image name), so no held-out image reaches
    its fold's training rows, not even as a copy. Returns the counts per fold for the manifest."""
    sources = sources or {}
    unsourced = [a.name for a in augmented if a.name not in sources]
    if unsourced:
        raise ValueError(f"no source image for the augmented copy {unsourced[0]}")
    counts = []
    fit_names = {s.name for s in fit}
    for i, held in enumerate(heldout):
        held_names = {s.name for s in held}
        if not held_names <= fit_names:
            raise DataError(f"{layout.fold_heldout_list(i)}: {sorted(held_names - fit_names)[0]} is not in the "
                            f"training split ({TRAIN_SPLIT}): run tools.prepare_data (data-pre.sh) again")
        rest = [s for s in fit if s.name not in held_names]
        copies = [a for a in augmented if sources[a.name] not in held_names]
        stage1, stage2 = stage_sets(rest, composition, seed, copies)
        write_sft_rows(layout.fold_train_jsonl(i, "stage1"), stage1)
        write_sft_rows(layout.fold_train_jsonl(i, "stage2"), stage2)
        write_sft_rows(layout.fold_heldout_jsonl(i), held)
        write_list(layout.fold_heldout_list(i), held)
        counts.append({"heldout": class_counts(held), "stage1_rows": class_counts(stage1),
                       "stage2_rows": class_counts(stage2)})
    return counts


def count_table(columns: dict[str, list[Sample]]) -> str:
    """A per-class count table, one column per named list."""
    counts = {name: class_counts(items) for name, items in columns.items()}
    width = max(8, *(len(n) for n in columns))
    lines = ["label     " + "".join(f"{n:>{width + 1}}" for n in columns)]
    for label in LABELS:
        lines.append(f"{label:<7}" + "".join(f"{counts[n][label]:>{width + 1}}" for n in columns))
    lines.append("total     " + "".join(f"{len(items):>{width + 1}}" for items in columns.values()))
    return "\n".join(lines)


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
    composition = {key: getattr(args, key) for key in DEFAULT_COMPOSITION}
    stage1, stage2 = stage_sets(fit, composition, args.seed)
    layout = Layout(args.output_dir)
    shutil.rmtree(augmented_dir(layout), ignore_errors=True)  # a new split: earlier copies no longer apply
    shutil.rmtree(layout.folds_data_dir, ignore_errors=True)  # and neither do earlier folds
    write_sft_rows(layout.train_jsonl("stage1"), stage1)
    write_sft_rows(layout.train_jsonl("stage2"), stage2)
    for stage in ("stage1", "stage2"):
        write_sft_rows(layout.val_jsonl(stage), val)
    write_jsonl(layout.test_jsonl, (sft_row(s.path, None) for s in test))
    write_list(layout.val_list, val)
    write_list(train_split_list(layout), fit)
    manifest = {
        "train_list": str(train_list.resolve()), "train_images": str(train_images.resolve()),
        "test_list": str(test_list.resolve()), "test_images": str(test_images.resolve()),
        "test_labelled": test[0].label is not None, "seed": args.seed, "val_ratio": args.val_ratio,
        "composition": composition, "folds": args.folds,
        "counts": {"train": class_counts(fit), "val": class_counts(val), "test": class_counts(test),
                   "stage1_rows": class_counts(stage1), "stage2_rows": class_counts(stage2)},
    }
    if args.folds > 1:
        manifest["counts"]["folds"] = write_folds(layout, fit, stratified_folds(fit, args.folds, args.seed),
                                                  composition, args.seed)
    write_json(layout.manifest, manifest)
    write_pipeline_env(layout.pipeline_env, recipe=args.recipe, model_stage1=args.model_stage1,
                       model_stage2=args.model_stage2, test_list=manifest["test_list"],
                       test_labelled=int(manifest["test_labelled"]),
                       folds=args.folds if args.folds > 1 else None)  # FOLDS=1: the file is as before
    columns = {"train": fit, "val": val, "stage1": stage1, "stage2": stage2}
    if manifest["test_labelled"]:
        columns["test"] = test
    print(count_table(columns))
    print(f"test: {len(test)} images ({'labelled' if manifest['test_labelled'] else 'unlabelled'})")
    if args.folds > 1:
        sizes = ", ".join(str(sum(c["heldout"].values())) for c in manifest["counts"]["folds"])
        print(f"{args.folds} folds of the training split for out-of-fold predictions: {sizes} images held out")
    print(f"wrote {layout.data_dir}")
    return manifest


def write_pipeline_env(path: Path, **settings) -> None:
    """Shell defaults for train.sh and test.sh; a variable already set in the environment wins."""
    lines = ["# Written by data-pre.sh; train.sh and test.sh source it. Variables set in the environment win."]
    for key, value in settings.items():
        if value is not None and value != "":
            lines.append(f': "${{{key.upper()}:={shlex.quote(str(value))}}}"')
    write_text(path, "\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.prepare_data", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="competition data folder (official layout)")
    ap.add_argument("--output-dir", default="outputs", help="pipeline output folder (default: %(default)s)")
    ap.add_argument("--train-list", help=f"default: <data-dir>/{TRAIN_LIST}")
    ap.add_argument("--train-images", help=f"default: <data-dir>/{TRAIN_IMAGES}/")
    ap.add_argument("--test-list", help=f"default: <data-dir>/{TEST_LIST}")
    ap.add_argument("--test-images", help=f"default: <data-dir>/{TEST_IMAGES}/")
    ap.add_argument("--val-ratio", type=float, default=0.1, help="validation share per label (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--stage1-min-share", type=float, default=DEFAULT_COMPOSITION["stage1_min_share"],
                    help="repeat rare labels in stage 1 up to this share of rows; 0 = off (default: %(default)s)")
    ap.add_argument("--stage2-high-repeat", type=int, default=DEFAULT_COMPOSITION["stage2_high_repeat"],
                    help="copies of each 高风险 image in stage 2 (default: %(default)s)")
    ap.add_argument("--stage2-other-ratio", type=float, default=DEFAULT_COMPOSITION["stage2_other_ratio"],
                    help="低风险/无风险/非楼道 images in stage 2, as a multiple of the 高风险 count")
    ap.add_argument("--folds", type=parse_folds, default=1,
                    help="k > 1: also deal the training split into k stratified folds, with training sets without "
                         "each fold, for out-of-fold predictions (FOLDS; default: %(default)s = no folds)")
    ap.add_argument("--workers", type=int, default=None, help="processes for image checks (default: all cores)")
    ap.add_argument("--recipe", help="training recipe (recipes/<name>.env) recorded for train.sh/test.sh")
    ap.add_argument("--model-stage1", help="stage-1 base model (id or folder) recorded for train.sh")
    ap.add_argument("--model-stage2", help="stage-2 base model (id or folder) recorded for train.sh")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prepare(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
