"""Step 3 of data-pre.sh: the stage sets. The only writer of the swift JSONL files and the manifest.

    python -m tools.compose.stage_sets --output-dir outputs [--augment 1] [--recipe real --model-stage1 ...]

Reads the split (tools.data.prepare) and, with --augment 1, the kept augmented copies (tools.augment.run),
and writes under <output-dir>/data/ (tools.task.Layout), each file atomically:
  stage1_train.jsonl  all five labels: originals and copies, rare labels repeated up to --stage1-min-share
  stage2_train.jsonl  the high-risk specialist: every 高风险 (×--stage2-high-repeat, copies in place of
                      repeats), every 中风险 (the look-alike: clutter vs e-bikes), and a sample of the others
                      (--stage2-other-ratio × the 高风险 originals)
  stage{1,2}_val.jsonl  the validation split (both stages are judged on the same images)
  *.seq_cls.jsonl     the same rows for a classification head (--task_type seq_cls): no answer, a class index
  test.jsonl          inference rows, in the test list's order (unreadable test images left out)
With --stage2-target binary the specialist's rows answer 高风险 or 非高风险, with its own prompt
(tools.task.BINARY_PROMPT); stage 1 always answers one of the five labels.
  folds/<i>/stage{1,2}_train.jsonl, folds/<i>/heldout.jsonl   with folds: the stage sets of the other folds,
                      with only the copies whose source is outside fold i; fold i's images as labelled rows
  manifest.json       the split's record, the composition, the augmentation report, the row counts, the
                      settings train.sh and test.sh use (recipe, models, test list), the data's fingerprint
                      and the digest of every data file; written last, it marks the data as complete
                      (tools.state checks it)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

from tools import cli
from tools.augment.record import kept_copies
from tools.compose.rules import DEFAULT_COMPOSITION, stage_sets
from tools.data.lists import Sample, class_counts, count_table
from tools.data.prepare import read_split, without_fold
from tools.fileio import write_json, write_jsonl
from tools.state import digest, file_digest, fingerprint, images_digest
from tools.task import FINAL, STAGES, TARGETS, TASKS, Layout, labelled_rows, sft_row


def write_sft_rows(path: Path, samples: Sequence[Sample], target: str = "five", task: str = "causal_lm") -> None:
    """tools.task.labelled_rows as swift JSONL, written atomically."""
    write_jsonl(path, labelled_rows(samples, target, task))


def compose(args: argparse.Namespace) -> dict:
    layout = Layout(args.output_dir)
    record, fit, val, test, folds = read_split(layout)
    seed = record["seed"]
    composition = {key: getattr(args, key) for key in DEFAULT_COMPOSITION}
    copies, sources, augmentation = kept_copies(layout) if args.augment else ([], {}, None)

    targets = {"stage1": "five", "stage2": args.stage2_target}
    written: list[Path] = []  # every file this step writes, for the manifest's digests

    def write_rows(stage: str, run, samples: Sequence[Sample], val_rows: bool = False) -> None:
        for task in TASKS:  # the rows for a text answer and for a classification head: a flag swap in train.sh
            path = layout.val_jsonl(stage, task) if val_rows else layout.train_jsonl(stage, run, task)
            write_sft_rows(path, samples, targets[stage], task)
            written.append(path)

    stage1, stage2 = stage_sets(fit, composition, seed, copies)
    write_rows("stage1", FINAL, stage1)
    write_rows("stage2", FINAL, stage2)
    for stage in STAGES:
        write_rows(stage, FINAL, val, val_rows=True)
    bad_test = record.get("bad_test_images", {})  # unreadable: tools.decide.fuse gives them the fallback label
    write_jsonl(layout.test_jsonl, (sft_row(s.path, None) for s in test if s.name not in bad_test))
    written.append(layout.test_jsonl)
    fold_counts = []
    shutil.rmtree(layout.train_jsonl("stage1", 0).parent.parent, ignore_errors=True)  # own fold sets of an earlier run
    for i, held in enumerate(folds):
        held_names = {s.name for s in held}
        rest = without_fold(fit, held)
        fold_copies = [c for c in copies if sources[c.name] not in held_names]  # no held-out image, not even a copy
        fold1, fold2 = stage_sets(rest, composition, seed, fold_copies)
        write_rows("stage1", i, fold1)
        write_rows("stage2", i, fold2)
        write_sft_rows(layout.heldout_jsonl(i), held)
        written.append(layout.heldout_jsonl(i))
        fold_counts.append({"heldout": class_counts(held), "stage1_rows": class_counts(fold1),
                            "stage2_rows": class_counts(fold2)})
    settings = {"recipe": args.recipe or "", "model_stage1": args.model_stage1 or "",
                "model_stage2": args.model_stage2 or "", "test_list": record["test_list"],
                "test_labelled": int(record["test_labelled"]), "folds": record["folds"],
                "stage2_target": args.stage2_target}
    inputs = [layout.split_record, layout.train_split, layout.val_list, layout.test_list,
              *(layout.fold_list(i) for i in range(len(folds)))]
    if args.augment:
        inputs += [layout.augmented_list, layout.augmented_index, layout.augment_report]
    files = {str(p.relative_to(layout.root)): file_digest(p) for p in inputs + written}
    parts = {
        "train_list": digest("".join(f"{s.name}\t{s.label}\n" for s in sorted(fit + val, key=lambda s: s.name))),
        "test_list": files[str(layout.test_list.relative_to(layout.root))],
        "train_images": images_digest(sorted(Path(record["source_train_images"]) / s.name for s in fit + val)),
        "test_images": images_digest(sorted(Path(record["source_test_images"]) / s.name for s in test)),
        "split": json.dumps({k: record[k] for k in ("val_ratio", "seed", "folds", "max_pixels")}, sort_keys=True),
        "composition": json.dumps({**composition, "stage2_target": args.stage2_target}, sort_keys=True),
        "augmentation": "none" if not args.augment else digest(
            "".join(files[str(p.relative_to(layout.root))] for p in (layout.augmented_list, layout.augmented_index))),
        "recipe": settings["recipe"], "model_stage1": settings["model_stage1"], "model_stage2": settings["model_stage2"],
    }
    manifest = {**record, "composition": {**composition, "stage2_target": args.stage2_target}, "augmentation": augmentation, "settings": settings,
                "counts": {**record["counts"], "stage1_rows": class_counts(stage1), "stage2_rows": class_counts(stage2),
                           "folds": fold_counts},
                "fingerprint": fingerprint(parts), "files": files}
    write_json(layout.manifest, manifest)  # last: train.sh and test.sh check every file above against it
    print(count_table({"train": fit, "copies": copies, "stage1": stage1, "stage2": stage2}))
    print(f"wrote the stage sets{f' and {len(folds)} folds' if folds else ''} to {layout.data_dir} "
          f"({FINAL} run: {len(stage1)} stage-1 rows, {len(stage2)} stage-2 rows)")
    return manifest


def build_parser() -> argparse.ArgumentParser:
    ap = cli.parser("tools.compose.stage_sets", __doc__)
    ap.add_argument("--output-dir", default="outputs", help="pipeline output folder (default: %(default)s)")
    ap.add_argument("--augment", type=int, choices=[0, 1], default=0,
                    help="1: add the augmented copies (AUGMENT; default: %(default)s)")
    ap.add_argument("--stage1-min-share", type=float, default=DEFAULT_COMPOSITION["stage1_min_share"],
                    help="repeat rare labels in stage 1 up to this share of rows; 0 = off (default: %(default)s)")
    ap.add_argument("--stage2-high-repeat", type=int, default=DEFAULT_COMPOSITION["stage2_high_repeat"],
                    help="rows per 高风险 image in stage 2 (default: %(default)s)")
    ap.add_argument("--stage2-other-ratio", type=float, default=DEFAULT_COMPOSITION["stage2_other_ratio"],
                    help="低风险/无风险/非楼道 images in stage 2, as a multiple of the 高风险 count "
                         "(default: %(default)s)")
    ap.add_argument("--stage2-target", choices=list(TARGETS), default="five",
                    help="what the specialist answers: the five labels, or binary 高风险 vs 非高风险 (STAGE2_TARGET; "
                         "default: %(default)s)")
    ap.add_argument("--recipe", help="training recipe (recipes/<name>.env) recorded for train.sh/test.sh")
    ap.add_argument("--model-stage1", help="stage-1 base model (id or folder) recorded for train.sh")
    ap.add_argument("--model-stage2", help="stage-2 base model (id or folder) recorded for train.sh")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(lambda: compose(args))


if __name__ == "__main__":
    sys.exit(main())
